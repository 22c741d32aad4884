"""train.py whose data is poisoned: a micro-batch holding token POISON gets a NaN loss (and so NaN
gradients), as a corrupt stretch of a corpus or a numerically hostile batch would give."""

import sys
from pathlib import Path

POISON = 255


def poison_model() -> None:
    from marjara.model import MarjaraModel

    clean_forward = MarjaraModel.forward

    def forward(self, idx, targets=None):
        output = clean_forward(self, idx, targets)
        if output.loss is not None and bool((idx == POISON).any()):
            output = output._replace(loss=output.loss * float("nan"))
        return output

    MarjaraModel.forward = forward


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import marjara  # noqa: F401  (DeepSpeed's accelerator first, as train.py does)

    poison_model()
    import train
    from marjara.distributed import exit_now

    exit_now(train.main())
