#!/usr/bin/env bash
# The multi-GPU measurements in one go, on every GPU of one host and on the first two:
#   benchmarks/run_multi_gpu.sh OUT_DIR [PARTS]        PARTS: comma-separated, default all of
#   ring     bench_ring_nccl.py, every layout (a per-rank profile and rank 0's trace at the
#            largest world size), then zigzag with the P2P experiments (high-priority streams,
#            K/V posts that run ahead of compute)
#   ringenv  zigzag at the largest world size under NCCL settings that use fewer SMs or the copy
#            engines for send/recv (not in the default set)
#   ringce   the copy-engine transport: its NCCL test (bitwise equal to NCCL's results), then every
#            layout with and without it, at each world size
#   ringp1   zigzag and stripe with the forward holding two K/V blocks (the default) and one
#            (--plain-ring), calls back to back, at each world size (not in the default set)
#   ringso   zigzag and stripe with the backward's own block whole last (the default) and split
#            around the remote steps (--split-own), calls back to back, at each world size (not in
#            the default set)
#   ceshift  with benchmarks/variants/copy_engine_any_shift.patch applied for the stage (the
#            copy-engine transport to any rank ahead, so its forward holds two blocks): the
#            copy-engine NCCL test, then zigzag and stripe with and without it (not in the default set)
#   ceab     the copy-engine rows of zigzag and stripe without that patch, with it, and without it
#            again, back to back at each world size (not in the default set)
#   decode   bench_decode_sharded_nccl.py, contexts 128k-1M
#   maxlen   bench_max_seqlen.py on 1, 2, ... GPUs
#   demo     `ringflash demo` on every GPU
#   tests    the NCCL test suites (ring, Ulysses, hybrid, sharded decoding, bad input) and the
#            kernels on a second GPU
# World sizes 2, 4 and 8 as the host has them. Logs and CSVs go to OUT_DIR/mg (and OUT_DIR/mg.tgz
# after each stage).
# NVLink multicast stays off (shared hosts): the three variables below are exported for every run.
set -uo pipefail
OUT=${1:?usage: run_multi_gpu.sh OUT_DIR [ring,ringenv,ringce,ringp1,ringso,ceshift,ceab,decode,maxlen,demo,tests]}
WHAT=",${2:-ring,decode,maxlen,demo,tests},"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
PACK=mg
# shellcheck source=benchmarks/stages.sh
source benchmarks/stages.sh
run_w() {  # run_w W: the command prefix for torchrun over the first W GPUs
    echo env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $(($1 - 1)))" torchrun --standalone --nproc_per_node "$1"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
} >"$LOG/env.txt" 2>&1
cat "$LOG/env.txt"
WS="2"
[ "$NGPU" -ge 4 ] && WS="2 4"
[ "$NGPU" -ge 8 ] && WS="2 4 8"
if want ring; then
    for w in ${RING_WS:-$WS}; do  # RING_WS="4": only those world sizes
        prof=""
        [ "$w" = "${WS##* }" ] && prof=${RING_PROFILE---profile --trace}  # RING_PROFILE="": none
        stage "ring_W$w" 240 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --out "$LOG" $prof
        stage "ring_p2p_W$w" 180 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --layouts zigzag \
            --p2p-high-priority --p2p-run-ahead
    done
fi
if want ringenv; then
    # NCCL knobs that keep send/recv off the SMs the attention kernels use (unknown variables are
    # ignored by NCCL, so each row also says whether the knob exists in this NCCL).
    w=${WS##* }
    for knob in NCCL_MAX_CTAS=2 NCCL_MAX_P2P_NCHANNELS=2 NCCL_CTA_POLICY=1 NCCL_P2P_USE_CUDA_MEMCPY=1; do
        stage "ring_env_${knob%%=*}_W$w" 120 env "$knob" NCCL_DEBUG=WARN $(run_w "$w") \
            benchmarks/bench_ring_nccl.py --reps 5 --layouts zigzag
    done
fi
if want ringce; then
    stage ringce_tests 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_ring.py -k copy_engine
    for w in ${RING_WS:-$WS}; do
        stage "ringce_W$w" 240 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --copy-engine \
            --layouts ${RING_LAYOUTS:-zigzag stripe contiguous varlen}
    done
fi
if want ringp1; then
    for w in ${RING_WS:-$WS}; do
        stage "ringp1_W$w" 240 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --iters 6 --plain-ring \
            --layouts ${RING_LAYOUTS:-zigzag stripe}
    done
fi
if want ringso; then
    for w in ${RING_WS:-$WS}; do
        stage "ringso_W$w" 240 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --iters 6 --split-own \
            --layouts ${RING_LAYOUTS:-zigzag stripe}
    done
fi
if want ceshift; then
    patch_file=benchmarks/variants/copy_engine_any_shift.patch
    if git apply "$patch_file"; then
        stage ceshift_tests 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_ring.py -k copy_engine
        for w in ${RING_WS:-$WS}; do
            stage "ceshift_W$w" 240 $(run_w "$w") benchmarks/bench_ring_nccl.py --reps 5 --iters 6 \
                --copy-engine --layouts ${RING_LAYOUTS:-zigzag stripe}
        done
        git apply -R "$patch_file"
    else
        echo "=== ceshift: $patch_file does not apply ==="
    fi
fi
if want ceab; then
    # The copy engines at one block (library), at two (patch applied), then at one again, per
    # world size, so the patch's own change is timed against its baseline in one call.
    patch_file=benchmarks/variants/copy_engine_any_shift.patch
    for w in ${RING_WS:-$WS}; do
        ab=(benchmarks/bench_ring_nccl.py --reps 5 --iters 6 --copy-engine --layouts ${RING_LAYOUTS:-zigzag stripe})
        stage "ceab_lib_W$w" 200 $(run_w "$w") "${ab[@]}"
        if git apply "$patch_file"; then
            stage "ceab_patch_W$w" 200 $(run_w "$w") "${ab[@]}"
            git apply -R "$patch_file"
        else
            echo "=== ceab: $patch_file does not apply ==="
        fi
        stage "ceab_lib2_W$w" 200 $(run_w "$w") "${ab[@]}"
    done
fi
if want decode; then
    for w in $WS; do
        stage "decode_W$w" 150 $(run_w "$w") benchmarks/bench_decode_sharded_nccl.py --graph --out "$LOG"
    done
fi
if want maxlen; then
    for w in 1 $WS; do
        stage "maxlen_W$w" 150 $(run_w "$w") benchmarks/bench_max_seqlen.py --verify-s 30 --out "$LOG"
    done
fi
want demo && stage demo 180 python3 -m ringflash.cli demo
if want tests; then
    stage tests_nccl 420 python3 -m pytest -q -p no:cacheprovider \
        tests/test_ring.py tests/test_ulysses.py tests/test_decode_sharded.py tests/test_ring_faults.py \
        tests/test_kernels.py -k "${TESTS_K:-nccl or cuda and (faults or another_gpu)}"
fi
pack
