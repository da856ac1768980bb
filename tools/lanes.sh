# Stages and lanes for long test runs (.ci/run, tools/test-all), sourced by bash:
#
#   stage NAME COMMAND...       run COMMAND here; record its time and the machine's CPU use
#   lane NAME COMMAND...        run COMMAND (usually a `stage`) beside the caller; its output
#                               goes to build/logs/lane-NAME.log
#   join NAME                   wait for a lane, print its output, fail if it failed
#
# Lanes are for stages that hold no timing assertion and no bench: a stage that measures
# time runs alone. On exit (failure, Ctrl-C, CI's cut-off) every lane still running is
# interrupted (SIGINT, so its own clean-up runs), then the stages' table is printed:
# start, duration, lane, CPU cores busy on average while it ran (of this machine's). A
# caller's `lanes_cleanup` function, if it has one, runs after the lanes have stopped.
# One summary per run: the outermost caller owns it, nested callers add to it.

LANES_LOGS=${LANES_LOGS:-build/logs}
mkdir -p "$LANES_LOGS"
if [ -z "${LANES_SUMMARY:-}" ]; then
    export LANES_SUMMARY=$LANES_LOGS/stages.tsv LANES_T0=$(date +%s) LANES_OWNER=$$
    : >"$LANES_SUMMARY"
fi
declare -A LANES_PID=()
LANES_NAME=${LANES_NAME:-main}

_lanes_cpu() {  # busy and total jiffies of the whole machine
    awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat
}

_lanes_verdict() {  # STATUS WORD: WORD when STATUS is 0, else FAILED (STATUS)
    if [ "$1" = 0 ]; then echo "$2"; else echo "FAILED ($1)"; fi
}

_lanes_clock() {
    local s=$(($(date +%s) - LANES_T0))
    printf '%d:%02d' $((s / 60)) $((s % 60))
}

stage() {
    local name=$1 status=0 begin busy0 total0 busy1 total1
    shift
    begin=$(date +%s)
    read -r busy0 total0 < <(_lanes_cpu)
    echo "== [$(_lanes_clock)] $name ($LANES_NAME)"
    "$@" || status=$?
    read -r busy1 total1 < <(_lanes_cpu)
    local took=$(($(date +%s) - begin)) cores
    cores=$(awk -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) -v n="$(nproc)" \
        'BEGIN { printf "%.1f", (t > 0 ? n * b / t : 0) }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$((begin - LANES_T0))" "$took" "$LANES_NAME" \
        "$cores" "$(_lanes_verdict $status ok)" "$name" \
        >>"$LANES_SUMMARY"
    echo "== [$(_lanes_clock)] $name: $(_lanes_verdict $status done) in ${took} s," \
        "${cores} cores busy"
    return $status
}

lane() {
    local name=$1
    shift
    echo "== [$(_lanes_clock)] lane $name starts beside $LANES_NAME;" \
        "its output: $LANES_LOGS/lane-$name.log"
    # A session of its own, with SIGINT back to its default: bash starts background jobs
    # with SIGINT ignored, and a lane must be interruptible so its clean-up runs.
    LANES_NAME=$name python3 -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.execvp("bash", ["bash", "-c", ". tools/lanes.sh; \"$@\"", "lane", *sys.argv[1:]])' "$@" \
        >"$LANES_LOGS/lane-$name.log" 2>&1 </dev/null &
    LANES_PID[$name]=$!
}

join() {
    local name=$1 status=0
    wait "${LANES_PID[$name]}" || status=$?
    unset "LANES_PID[$name]"
    echo "== [$(_lanes_clock)] lane $name ended ($(_lanes_verdict $status ok)); its output:"
    sed 's/^/    /' "$LANES_LOGS/lane-$name.log"
    return $status
}

_lanes_stop() {
    local name pid
    for name in "${!LANES_PID[@]}"; do
        pid=${LANES_PID[$name]}
        echo "== stopping lane $name (its clean-up runs first)"
        kill -INT -- "-$pid" 2>/dev/null || true
    done
    for name in "${!LANES_PID[@]}"; do
        pid=${LANES_PID[$name]}
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "    lane $name's last lines:"
        tail -n 30 "$LANES_LOGS/lane-$name.log" | sed 's/^/    | /'
    done
}

_lanes_report() {
    [ "${LANES_OWNER:-}" = "$$" ] || return 0
    local total=$(($(date +%s) - LANES_T0))
    echo
    echo "== stages (start, seconds, lane, cores busy of $(nproc), result, stage):"
    sort -n "$LANES_SUMMARY" | awk -F'\t' '{ printf "   %3d:%02d %6d s  %-10s %4s  %-12s %s\n",
        $1 / 60, $1 % 60, $2, $3, $4, $5, $6 }'
    printf '== total: %d s (%d min %02d s)\n' "$total" $((total / 60)) $((total % 60))
}

_lanes_exit() {
    local status=$?
    trap - EXIT INT TERM
    _lanes_stop
    if declare -F lanes_cleanup >/dev/null; then lanes_cleanup; fi  # the caller's own
    _lanes_report
    exit $status
}
trap _lanes_exit EXIT
trap 'exit 130' INT TERM
