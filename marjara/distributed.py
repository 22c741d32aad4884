"""Process-group bootstrap, and the one place MARJARA issues collectives.

Every collective of MARJARA's own (not DeepSpeed's) goes through the functions below: they place
tensors on the accelerator's current device (NCCL serves CUDA tensors only; gloo would take any)
and take the same path at world size 1 as at N, so a one-GPU run exercises every one of them.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group() -> None:
    """Initialise DeepSpeed's process group once.

    Under deepspeed/torchrun/mpirun the launcher's variables define the world. With none of them
    (plain `python`, tests, inference) a one-rank world on loopback is set up, because DeepSpeed
    would otherwise fall into MPI discovery and fail without mpi4py. Under a bare `mpirun`,
    DeepSpeed's MPI discovery (mpi4py) fills the variables in.
    """
    import deepspeed
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        return
    under_mpi = any(var in os.environ for var in _MPI_VARS)
    if not dist.is_initialized() and not under_mpi and not all(var in os.environ for var in _LAUNCHER_VARS):
        # A one-rank world of our own. It is passed to torch directly rather than through
        # MASTER_PORT & co., which child processes (other launches) would inherit and collide on.
        from deepspeed.accelerator import get_accelerator

        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
        dist.init_process_group(get_accelerator().communication_backend_name(), rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")
    # The accelerator picks the backend (nccl on NVIDIA GPUs, gloo on CPU); a torch process group
    # that already exists is adopted as it is.
    deepspeed.init_distributed(auto_mpi_discovery=under_mpi, verbose=False)
    _remove_shm_buffer_at_exit()


def _remove_shm_buffer_at_exit() -> None:
    """Each rank removes its own DeepSpeed shared-memory buffer (DeepSpeed never does) when its
    process ends, however it ends (short of SIGKILL).
    The peers map it while their process group starts; the barrier makes sure every rank is past
    that, so the name is free to go (mappings stay valid after the unlink)."""
    barrier()
    from marjara.compat.deepspeed import shm_buffer_path

    path = shm_buffer_path(rank())
    if path.exists():
        atexit.register(path.unlink, missing_ok=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---- collectives ------------------------------------------------------------------------
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def accelerator_device() -> torch.device:
    """The device collectives use: the accelerator's current device (cuda:LOCAL_RANK, or cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _on_device(tensor: torch.Tensor, empty: bool = False) -> torch.Tensor:
    """A copy of `tensor` on the accelerator's device (never the caller's tensor itself), or with
    `empty` an uninitialised tensor of its shape and dtype there. Every tensor the functions below
    hand to torch.distributed comes from here."""
    if empty:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=accelerator_device())
    return tensor.detach().to(accelerator_device(), non_blocking=True, copy=True)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """The reduction over the group's ranks of a copy of `tensor`, on the accelerator's device;
    `tensor` itself is left as it was."""
    result = _on_device(tensor)
    if dist.is_initialized():
        dist.all_reduce(result, op=_OPS[op], group=group)
    return result


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), in group-rank order, on the accelerator's device."""
    mine = _on_device(tensor)
    if not dist.is_initialized():
        return [mine]
    pieces = [_on_device(mine, empty=True) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, mine, group=group)
    return pieces


def broadcast_(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite `tensor` in place with global rank `src`'s; returns it."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.detach() if tensor.device == accelerator_device() else _on_device(tensor)
    dist.broadcast(on_device, src=src, group=group)
    if on_device.data_ptr() != tensor.data_ptr():
        with torch.no_grad():
            tensor.copy_(on_device)
    return tensor


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank `src`'s picklable `obj` on every rank (torch's object API, through the accelerator's device)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=accelerator_device())
    return box[0]


def barrier(group=None) -> None:
    """Wait for every rank of the group: an all-reduce of one element on the accelerator's device,
    so that it, too, reaches the backend only with a tensor of the type the backend serves. Reading
    the result makes the host wait (an NCCL collective only orders the device's stream)."""
    all_reduce(torch.ones(1, dtype=torch.int64), group=group).item()


def shutdown() -> None:
    """Leave the process group together, at the end of a distributed job.

    Without the barrier rank 0, which hosts the rendezvous store, may exit while a peer is still
    connected, and its C++ threads abort the process (exit 250). DeepSpeed's destroy_process_group()
    also drops its registry of groups, so that the groups no engine holds are freed here (call
    marjara.compat.deepspeed.release_engine(engine) and drop the engine first). See exit_now()
    for those that outlive this.
    """
    if not dist.is_initialized():
        return
    barrier()
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()


def exit_now(code: int) -> NoReturn:
    """End a launched process with `code`: what a normal exit runs, except the interpreter teardown.

    Some gloo groups outlive shutdown(): ZeRO-3 parameters, MoE layers and the optimizer still
    hold them. Their worker threads may still be dropping the last reference to a finished
    collective's tensor; if that happens while the interpreter is being torn down, the thread
    cannot take the GIL, is unwound through a noexcept frame, and the process aborts ("terminate
    called without an active exception", SIGABRT) after a run that succeeded. The race is rare,
    so no test can show its absence; skipping the teardown removes the window it needs. Every
    file is closed before this is called.
    """
    atexit._run_exitfuncs()  # logging, torch.compile's workers, weakref finalizers
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        # mpi4py finalizes only during the teardown skipped here, and Open MPI's mpirun reports a
        # rank that exits without MPI_Finalize as failed.
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
