#!/usr/bin/env bash
# DeepSpeed (ZeRO-2) + ringflash sequence parallelism on CPU: torchrun starts the ranks (the
# deepspeed launcher's --num_gpus needs GPUs), deepspeed.init_distributed takes torchrun's env, gloo.
#   launch/deepspeed_run_cpu.sh [NPROC] [extra args for deepspeed_train_lm.py]
# On GPUs: deepspeed --num_gpus N launch/deepspeed_train_lm.py --deepspeed_config launch/ds_config_zero.json
set -euo pipefail
NPROC=${1:-2}
shift || true
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "$NPROC" launch/deepspeed_train_lm.py \
    --deepspeed_config launch/ds_config_zero.json "$@"
