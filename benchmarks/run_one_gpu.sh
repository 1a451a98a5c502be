#!/usr/bin/env bash
# The one-GPU checks and measurements in one go (one call of a lent GPU machine):
#   benchmarks/run_one_gpu.sh OUT_DIR [PARTS] [SECONDS]   PARTS: comma-separated, default all of
#   dtests     the CUDA decode tests (fused step, counters per stream / arena slices per capture, graphs)
#   decode     bench_decode.py (every row, beside SDPA flash and cuDNN, graphed step)
#   decodepdl  the same with the split kernel launched by programmatic dependent launch (--pdl on)
#   sweep      sweep_bwd.py: every backward tile config at head dim 128, timed alone
#   attention  bench_attention.py (every row, forward and backward, beside SDPA flash and cuDNN,
#              and the public flash_attn_func through autograd)
#   ktests     the CUDA kernel tests (every case, one tile per kernel; 64-bit offsets) and the CLI's
#   ring       bench_ring.py: the simulated ring at W = 2, 4, 8 (printed, RESULTS.md untouched),
#              then zigzag at W = 4, 8 timed on the synced wall clock, to compare
#   gqa        bench_gqa.py: the Llama-3-8B GQA shape, 8k-32k, the dK/dV head orders side by side
#   bandwidth  bench_decode.py --bandwidth: B=1 16k/32k, zeroing vs read-only flush vs a model's layers
#   pieces     bench_ring_pieces.py: every distinct ring step of zigzag at W = 8 and 4, timed alone
#   hostprof   bench_decode.py --host-profile: where an eager decoding step's host time goes
#   probe      bench_decode.py --probe: decoding kernel variants (pointer loads / TMA, tiles, splits)
#   probe16    the same at batch 16 (bench_decode.PROBE_SETS[16])
#   bwtma      bench_decode.py --bandwidth under use_tma("on")
#   order      bench_tile_order.py: kernels' program order, head-major vs grouped longest-first
#   ringz      bench_ring.py: zigzag at W = 4, 8 only (the library's defaults)
#   simtests   the simulated ring through the Triton kernels against the oracle (test_ring_sim -k cuda)
#   bwdov      bench_bwd_overlap.py: the backward's dQ beside dK/dV on a second stream, or after it
#   ringdq     bench_ring.py: zigzag at W = 2, 4, 8 with dQ beside dK/dV and after it, one process
#   ringso     bench_ring.py: zigzag at W = 2, 4, 8 with the backward's own block whole last and
#              split around the remote steps, one process
# SECONDS (default 560) bounds the whole run: each stage gets what is left, so a late stage is cut
# short rather than the call. Logs, tables and CSVs go to OUT_DIR/g (and OUT_DIR/g.tgz after each
# stage).
set -uo pipefail
OUT=${1:?usage: run_one_gpu.sh OUT_DIR [dtests,decode,sweep,attention,ktests,ring] [SECONDS]}
WHAT=",${2:-dtests,decode,sweep,attention,ktests,ring},"
BUDGET=${3:-560}
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PACK=g
# shellcheck source=benchmarks/stages.sh
source benchmarks/stages.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/env.txt"
want dtests && stage dtests 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_decode.py \
    tests/test_decode_counters.py -k cuda
want decode && stage decode 150 python3 benchmarks/bench_decode.py --out "$LOG/decode"
want decodepdl && stage decodepdl 150 python3 benchmarks/bench_decode.py --pdl on --out "$LOG/decode_pdl"
# SWEEP_ARGS (e.g. "--dims 64 --base-dims 64") and SWEEP_S (its seconds) narrow the sweep.
SWEEP_S=${SWEEP_S:-$(($(left) - 20))}
want sweep && stage sweep $((SWEEP_S + 20)) python3 benchmarks/sweep_bwd.py --out "$LOG/sweep" --budget "$SWEEP_S" ${SWEEP_ARGS:-}
want attention && stage attention 240 python3 benchmarks/bench_attention.py --api --out "$LOG/attention"
# KTESTS_CONFIGS=all autotunes every case (about a minute each) instead of one tile per kernel.
want ktests && RINGFLASH_TEST_CONFIGS=${KTESTS_CONFIGS:-one} stage ktests 400 python3 -m pytest -q \
    -p no:cacheprovider -rs tests/test_kernels.py tests/test_cli.py -k "cuda or offsets"
want ring && stage ring 150 python3 benchmarks/bench_ring.py --reps 3 --no-write --segments --out "$LOG/ring"
# The same zigzag rows timed the old way (synced wall clock: host launch time counts), to compare.
want ring && stage ring_wall 100 python3 benchmarks/bench_ring.py --reps 3 --no-write --timing wall \
    --worlds 4 8 --layouts zigzag
want gqa && stage gqa 200 python3 benchmarks/bench_gqa.py
want bandwidth && stage bandwidth 90 python3 benchmarks/bench_decode.py --bandwidth --out "$LOG/decode"
want pieces && stage pieces 150 python3 benchmarks/bench_ring_pieces.py --world 8
want pieces && stage pieces4 100 python3 benchmarks/bench_ring_pieces.py --world 4
# PROBE_ARGS (e.g. "--probe-contexts 131072,262144 --variants nopdl,pdl"): the probe's contexts
# and variants (PROBE16_ARGS: probe16's).
want probe && stage probe 200 python3 benchmarks/bench_decode.py --probe ${PROBE_ARGS:-} --out "$LOG/decode"
want probe16 && stage probe16 200 python3 benchmarks/bench_decode.py --probe --probe-batch 16 ${PROBE16_ARGS:-} --out "$LOG/decode"
want bwtma && stage bwtma 90 python3 benchmarks/bench_decode.py --bandwidth --tma on --out "$LOG/decode"
want order && stage order 200 python3 benchmarks/bench_tile_order.py
want bwdov && stage bwdov 200 python3 benchmarks/bench_bwd_overlap.py
want ringdq && stage ringdq 240 python3 benchmarks/bench_ring.py --reps 3 --no-write --worlds 2 4 8 \
    --layouts zigzag --dq-beside on off
want ringso && stage ringso 240 python3 benchmarks/bench_ring.py --reps 4 --no-write --worlds 2 4 8 \
    --layouts zigzag --split-own off on
want simtests && stage simtests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_ring_sim.py -k cuda
want ringz && stage ringz 150 python3 benchmarks/bench_ring.py --reps 3 --no-write --worlds 4 8 --layouts zigzag
want hostprof && stage hostprof 90 python3 benchmarks/bench_decode.py --host-profile --out "$LOG/decode"
pack
