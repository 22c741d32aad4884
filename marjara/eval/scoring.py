"""Log-likelihood of continuations, batched: what evaluation harnesses ask of a language model."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def in_batches(items: Sequence, batch_size: int, length: Callable[[object], int]):
    """(original indices, items) batches, longest first, so padding stays small."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield chosen, [items[i] for i in chosen]


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                          batch_size: int) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: (sum of log p(continuation | context),
    whether greedy decoding would produce exactly the continuation).

    Sequences longer than max_length + 1 lose their oldest context tokens (the model sees at most
    max_length tokens). Only the continuation positions go through the output head.
    """
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    device = next(model.parameters()).device
    model.eval()
    for indices, batch in in_batches(pairs, batch_size, lambda p: len(p[0]) + len(p[1])):
        inputs, spans = [], []
        for context, continuation in batch:
            if not continuation:
                raise ValueError("a continuation must have at least one token")
            whole = (context + continuation)[-(max_length + 1):]
            inputs.append(whole[:-1])
            spans.append((len(whole) - 1 - len(continuation), continuation))
        width = max(len(x) for x in inputs)
        idx = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
        for row, tokens in enumerate(inputs):
            idx[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        hidden = model.hidden_states(idx)
        for row, (index, (start, continuation)) in enumerate(zip(indices, spans)):
            logits = model.lm_head(hidden[row, start: start + len(continuation)]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation, device=device)
            total = logprobs.gather(-1, target[:, None]).sum().item()
            greedy = bool((logits.argmax(-1) == target).all())
            results[index] = (total, greedy)
    return results  # type: ignore[return-value]
