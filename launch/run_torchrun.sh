#!/usr/bin/env bash
# Sequence-parallel training example under torchrun (gloo on CPU, NCCL on GPUs).
#   launch/run_torchrun.sh [NPROC] [extra args for train_ring_lm.py]
set -euo pipefail
NPROC=${1:-4}
shift || true
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "$NPROC" launch/train_ring_lm.py "$@"
