#!/usr/bin/env bash
# launch/train_hf_llama.py with DeepSpeed on CPU (gloo): ALST (DeepSpeed's Ulysses, ringflash's kernels
# as its core) and ZeRO-3 by default. torchrun starts the ranks (the deepspeed launcher's --num_gpus
# wants GPUs in most DeepSpeed versions); deepspeed.init_distributed takes torchrun's environment.
#   launch/train_hf_llama_cpu.sh [NPROC] [extra args for train_hf_llama.py, e.g. --tiled --packed]
# On GPUs: deepspeed --num_gpus N launch/train_hf_llama.py --attn alst --zero 3
set -euo pipefail
NPROC=${1:-2}
shift || true
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "$NPROC" launch/train_hf_llama.py --attn alst --zero 3 "$@"
