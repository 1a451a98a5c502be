#!/usr/bin/env bash
# Several GPUs of one host: the NCCL tests, then the multi-GPU benchmarks at each world size the
# host has (2, 4, 8), everything into OUT_DIR.
#   benchmarks/run_multi_gpu.sh OUT_DIR [BENCH ...]   BENCH: default ring_nccl decode_sharded_nccl max_seqlen
# OUT_DIR gets env.txt (GPUs, topology, versions), tests.log, bench_W*.log and the CSVs (one per
# benchmark and world size). max_seqlen also runs on one GPU.
# NVLink multicast stays off (shared hosts): the three variables below are exported for every run.
set -uo pipefail
OUT=${1:?usage: run_multi_gpu.sh OUT_DIR [BENCH ...]}
shift
BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(ring_nccl decode_sharded_nccl max_seqlen)
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p "$OUT"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch; print('nccl', torch.cuda.nccl.version())"
    python3 -m ringflash.cli env
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_ring.py tests/test_ulysses.py tests/test_packed.py \
    tests/test_decode_sharded.py tests/test_ring_faults.py tests/test_kernels.py \
    -k "nccl or cuda and (faults or another_gpu)" 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
for w in 1 2 4 8; do
    [ "$w" -le "$NGPU" ] || continue
    names=()
    for b in "${BENCHES[@]}"; do  # one GPU: only max_seqlen (the others need two)
        [ "$w" -gt 1 ] || [ "$b" = max_seqlen ] && names+=("$b")
    done
    [ ${#names[@]} -gt 0 ] || continue
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((w - 1))) python3 -m ringflash.cli bench "${names[@]}" --nproc "$w" \
        --out "$OUT" 2>&1 | tee "$OUT/bench_W$w.log"
    rc=$((rc || PIPESTATUS[0]))
done
exit "$rc"
