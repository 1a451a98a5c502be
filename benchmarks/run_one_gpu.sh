#!/usr/bin/env bash
# One GPU: the CUDA tests, then the one-GPU benchmarks, everything into OUT_DIR.
#   benchmarks/run_one_gpu.sh OUT_DIR [BENCH ...]     BENCH: default attention decode ring packed
# OUT_DIR gets env.txt (GPU, driver, versions), tests.log, bench.log and each benchmark's CSV/PNG.
# RINGFLASH_TEST_CONFIGS=all autotunes every kernel test case instead of one tile per kernel (tests/conftest.py).
set -uo pipefail
OUT=${1:?usage: run_one_gpu.sh OUT_DIR [BENCH ...]}
shift
BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(attention decode ring packed)
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -m ringflash.cli env
} 2>&1 | tee "$OUT/env.txt"
RINGFLASH_TEST_CONFIGS=${RINGFLASH_TEST_CONFIGS:-one} python3 -m pytest -q -p no:cacheprovider -rs tests \
    -k "cuda or offsets" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m ringflash.cli bench "${BENCHES[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc, benchmarks: rc=$bench_rc"
exit $((tests_rc || bench_rc))
