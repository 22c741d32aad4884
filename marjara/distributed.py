"""Process-group bootstrap: the same code runs under a launcher or as one plain process."""

from __future__ import annotations

import atexit
import gc
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

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


def shm_buffer_path() -> Path:
    """The shared-memory file DeepSpeed's CPU comm op creates for this rank when every rank is on
    one node (LOCAL_SIZE == world size): /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (named in DeepSpeed's csrc/cpu/comm/shm.cpp). DeepSpeed never removes it."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank()}")


def _remove_shm_buffer_at_exit() -> None:
    """Each rank removes its own buffer when its process ends, however it ends (short of SIGKILL).
    The peers map it while their process group starts; the barrier makes sure every rank is past
    that, so the name is free to go (mappings stay valid after the unlink)."""
    if world_size() > 1:
        dist.barrier()
    path = shm_buffer_path()
    if path.exists():
        atexit.register(path.unlink, missing_ok=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown() -> None:
    """Leave the process group together, at the end of a distributed job.

    Without the barrier rank 0, which hosts the rendezvous store, may exit while a peer is still
    connected, and its C++ threads abort the process (exit 250). DeepSpeed's destroy_process_group()
    also drops its registry of groups, so that the groups no engine holds are freed here (call
    engine.destroy() and drop the engine first). See exit_now() for those that outlive this.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
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
