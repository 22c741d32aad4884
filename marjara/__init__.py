"""MARJARA: a DeepSpeed-backed decoder-only transformer pre-training stack."""

import glob
import os

# Without an accelerator DeepSpeed warns on every import until DS_ACCELERATOR is set. Looking for
# NVIDIA/AMD device nodes instead of asking torch keeps `import marjara` fast for the light CLIs.
if "DS_ACCELERATOR" not in os.environ and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
    os.environ["DS_ACCELERATOR"] = "cpu"

__version__ = "0.1.0"
