#!/usr/bin/env bash
# Started by mpirun on every rank: map the MPI library's rank variables to the ones torch and
# DeepSpeed read, then run PYTHON SCRIPT ARGS... (MASTER_ADDR/MASTER_PORT come from mpirun -x).
set -euo pipefail

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: mpirun ... launch/mpi_env.sh PYTHON SCRIPT [ARGS...]  (started by launch/mpi.sh)" >&2
  exit 2
fi

# Open MPI names, then PMI/PMIx (MPICH, Intel MPI, Slurm's srun --mpi=pmix).
RANK="${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-}}}"
WORLD_SIZE="${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-}}"
LOCAL_RANK="${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}"
LOCAL_WORLD_SIZE="${OMPI_COMM_WORLD_LOCAL_SIZE:-${MPI_LOCALNRANKS:-}}"
for var in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT; do
  if [[ -z "${!var:-}" ]]; then
    echo "error: $var is not set: start this under mpirun (with -x MASTER_ADDR -x MASTER_PORT)" >&2
    exit 2
  fi
done
# DeepSpeed's CPU shared-memory all-reduce is only used when every rank is on one node.
LOCAL_SIZE="$LOCAL_WORLD_SIZE"
export RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE
exec "$@"
