"""MARJARA: a DeepSpeed-backed decoder-only transformer pre-training stack."""

import os

# Without this DeepSpeed warns on every import on machines without a GPU; setting it only when
# no accelerator is visible keeps GPU machines on DeepSpeed's own auto-detection.
if "DS_ACCELERATOR" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

__version__ = "0.1.0"
