"""Process-group bootstrap: the same code runs under a launcher or as one plain process."""

from __future__ import annotations

import os
import socket

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
    if dist.is_initialized():
        import deepspeed.comm

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        return
    import deepspeed

    under_mpi = any(var in os.environ for var in _MPI_VARS)
    if not under_mpi and not all(var in os.environ for var in _LAUNCHER_VARS):
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # The accelerator picks the backend: nccl on NVIDIA GPUs, gloo on CPU.
    deepspeed.init_distributed(auto_mpi_discovery=under_mpi, verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0
