"""deepspeed.initialize as MARJARA calls it (the trainer and the benchmarks alike), with the
corrections of marjara.compat.deepspeed to what DeepSpeed does on its own."""

from __future__ import annotations

from marjara.compat.deepspeed import share_zero3_fp32_masters, skip_single_rank_allreduce


def initialize_engine(**kwargs):
    """deepspeed.initialize(**kwargs) -> the engine."""
    import deepspeed

    share_zero3_fp32_masters()
    engine, *_ = deepspeed.initialize(**kwargs)
    skip_single_rank_allreduce(engine)
    return engine

