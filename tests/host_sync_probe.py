"""Runs train.py's main in this process while counting host reads of tensors (`.item()`,
`.tolist()`, `.cpu()`, `.numpy()`, `float()`, `int()`, `bool()`: each waits for the device on a
GPU) made by MARJARA's own code, per micro-batch; prints one JSON list of
{"boundary": last micro-batch of its optimizer step, "syncs": reads until the next micro-batch}.

    python tests/host_sync_probe.py TRAIN_FLAGS...
"""

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402

MARJARA = str(ROOT / "marjara")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
windows: list[dict] = []


def counting(original):
    @functools.wraps(original)
    def read(self, *args, **kwargs):
        if windows and sys._getframe(1).f_code.co_filename.startswith(MARJARA):
            windows[-1]["syncs"] += 1
        return original(self, *args, **kwargs)
    return read


for name in READS:
    setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

forward = DeepSpeedEngine.forward


def counted_forward(self, *args, **kwargs):
    if self.module.training:
        windows.append({"boundary": bool(self.is_gradient_accumulation_boundary()), "syncs": 0})
    return forward(self, *args, **kwargs)


DeepSpeedEngine.forward = counted_forward
code = train.main(sys.argv[1:])
print(json.dumps(windows))
sys.exit(code)
