"""A process group that, like NCCL, serves one device type only: the accelerator's.

On a GPU, NCCL refuses a CPU tensor with `No backend type associated with device type cpu`; a
group made with backend "cuda:gloo" does the same on CPU (tests/test_distributed.py shows it), but
it refuses every tensor this machine can make. So the accelerator's device is faked instead:
`marjara.distributed.accelerator_device()` reports `cpu:0`, which no tensor's device equals, so
the helper must copy everything it sends; a tensor counts as "on the accelerator" when its storage
is a tensor the helper's placement (`_on_device`) made, and any other tensor that a collective called
from MARJARA's code receives is refused with NCCL's error. Collectives DeepSpeed issues itself
are let through: they are not MARJARA's.

What it cannot see: DeepSpeed's own collectives, dtypes NCCL lacks, stream ordering of
`non_blocking` copies, and NCCL's one rank per GPU.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import marjara.distributed as helper

MARJARA = str(Path(helper.__file__).resolve().parent)
TORCH_DIST = str(Path(dist.__file__).resolve().parent)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
FAKE_DEVICE = torch.device("cpu", 0)

placed: dict[int, weakref.ref] = {}  # the tensors the helper placed, by id
served = {"tensor": 0, "object": 0}
_inside_object_api = threading.local()


def _caller_is_marjara() -> bool:
    """Whether the first frame outside torch.distributed belongs to MARJARA's package."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIST):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(MARJARA)


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if torch.is_tensor(v))


def _refuse(kind: str) -> None:
    raise RuntimeError(f"No backend type associated with device type {kind}")


def _guard(name, original):
    @functools.wraps(original)
    def collective(*args, **kwargs):
        if getattr(_inside_object_api, "active", False) or not _caller_is_marjara():
            return original(*args, **kwargs)
        if name in ("barrier", "monitored_barrier"):
            _refuse("cpu")  # torch's barrier allocates its own tensor, on a device of its choosing
        for tensor in _tensors(args, kwargs):
            ref = placed.get(id(tensor))
            if ref is None or ref() is not tensor:
                _refuse(tensor.device.type)
        served["tensor"] += 1
        return original(*args, **kwargs)

    return collective


def _guard_object(name, original):
    @functools.wraps(original)
    def collective(*args, **kwargs):
        if getattr(_inside_object_api, "active", False) or not _caller_is_marjara():
            return original(*args, **kwargs)
        if kwargs.get("device") != FAKE_DEVICE:
            _refuse("cpu")  # without a device, torch picks one from the backend, not the accelerator
        served["object"] += 1
        _inside_object_api.active = True
        try:
            return original(*args, **kwargs)
        finally:
            _inside_object_api.active = False

    return collective


def install(monkeypatch=None) -> None:
    """Patch torch.distributed and the helper (with pytest's monkeypatch, or for the process)."""
    def put(obj, name, value):
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value)
        else:
            setattr(obj, name, value)

    original_place = helper._on_device

    def place(tensor, empty=False):
        result = original_place(tensor, empty)
        placed[id(result)] = weakref.ref(result)
        return result

    put(helper, "accelerator_device", lambda: FAKE_DEVICE)
    put(helper, "_on_device", place)
    for names, wrap in ((COLLECTIVES, _guard), (OBJECT_COLLECTIVES, _guard_object)):
        for name in names:
            guarded = wrap(name, getattr(c10d, name))
            put(c10d, name, guarded)
            put(dist, name, guarded)
