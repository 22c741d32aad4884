"""The short text sample printed at the end of a run."""

from __future__ import annotations


def print_sample(model, tokenizer, max_seq_len: int, tokens: int, seed: int, report) -> None:
    if tokens <= 0:
        return
    prompt = tokenizer.encode("The ") or [tokenizer.eot_id]
    budget = min(tokens, max_seq_len - len(prompt))
    # Every rank generates (ZeRO-3 and expert parallelism need all ranks in each forward).
    out = model.generate([prompt], budget, temperature=0.8, top_k=40, seed=seed, eos_token_id=tokenizer.eot_id)[0]
    report.print("sample: " + tokenizer.decode(prompt + out))
