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
            target = torch.tensor(continuation, device=device)
            results[index] = _score(model.lm_head, hidden[row, start: start + len(continuation)], target)
    return results  # type: ignore[return-value]


def _score(head, hidden: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """(sum of log p(target), whether each target is the argmax) over slices of head.chunk_tokens
    positions, as the training loss runs (marjara/model/head.py): a rolling window as long as the
    context never holds all its fp32 logits at once."""
    total = torch.zeros((), dtype=torch.float32, device=target.device)
    greedy = torch.ones((), dtype=torch.bool, device=target.device)
    for begin in range(0, target.numel(), head.chunk_tokens):
        logits = head(hidden[begin: begin + head.chunk_tokens]).float()
        wanted = target[begin: begin + head.chunk_tokens]
        total += torch.log_softmax(logits, dim=-1).gather(-1, wanted[:, None]).sum()
        greedy &= (logits.argmax(-1) == wanted).all()
    return total.item(), bool(greedy)
