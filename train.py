"""Pre-train a MARJARA model through the DeepSpeed engine.

    python train.py                                   # tiny preset, built-in corpus, one process
    deepspeed --num_gpus 8 train.py --deepspeed_config ds_configs/zero2.json --data data/
    torchrun --nproc_per_node 8 train.py --deepspeed_config ds_configs/zero3.json ...
"""

import sys

import marjara  # noqa: F401  (sets DeepSpeed's accelerator before deepspeed is imported)
from marjara.errors import cli_entry
from marjara.train.args import parse_config


@cli_entry
def main(argv=None) -> int:
    config = parse_config(argv)
    from marjara.compat.deepspeed import release_engine
    from marjara.distributed import shutdown
    from marjara.train.learner import Learner

    learner = Learner(config)
    code = learner.fit()
    release_engine(learner.engine)  # removes its hooks, which keep its process groups alive
    del learner
    shutdown()
    return code


if __name__ == "__main__":
    from marjara.distributed import exit_now

    try:
        code = main()
    except SystemExit as stop:  # a refused input (its line is printed): leave the same way
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr, flush=True)
    exit_now(code)
