# Time-limited stages for the device-run scripts (sourced by run_one_gpu.sh and run_multi_gpu.sh).
# The caller sets OUT (what comes back), PACK (the log folder's name under OUT), WHAT (",a,b,")
# and, optionally, BUDGET: seconds for all stages together, so a late stage is cut short rather
# than the whole call.
LOG=$OUT/$PACK
mkdir -p "$LOG"
T0=$SECONDS
pack() { tar czf "$OUT/$PACK.tgz" -C "$OUT" "$PACK" 2>/dev/null; }
left() { echo $((${BUDGET:-86400} - (SECONDS - T0))); }
want() { [[ $WHAT == *",$1,"* ]]; }
stage() {  # stage NAME MAX_S CMD...: run with min(MAX_S, time left), log to NAME.log, print the tail
    local name=$1 limit=$2
    shift 2
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -le 10 ]; then
        echo "=== $name: skipped, no time left ==="
        return
    fi
    local t0=$SECONDS
    echo "=== $name ($(date -u +%H:%M:%S), up to ${limit} s) ==="
    timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    # torchrun's and NCCL's per-rank warnings hide the result lines
    grep -v -e '^W11' -e 'OMP_NUM_THREADS' -e '^\*\*\*' "$LOG/$name.log" | tail -n 40
    echo "=== $name: rc=$rc, $((SECONDS - t0)) s ==="
    pack
}
