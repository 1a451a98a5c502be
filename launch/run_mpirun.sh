#!/usr/bin/env bash
# The same example under MPI, no torchrun: mpi4py supplies rank and world size, rank 0 broadcasts
# the rendezvous address, torch.distributed does the communication (ringflash.comm.init_from_mpi).
# Needs mpi4py and an MPI (pip install mpi4py mpich).
#   launch/run_mpirun.sh [NPROC] [extra args for train_ring_lm.py]
set -euo pipefail
NPROC=${1:-4}
shift || true
cd "$(dirname "$0")/.."
exec mpirun -n "$NPROC" python launch/train_ring_lm.py "$@"
