#!/usr/bin/env bash
# Run a command while every core is kept busy: one spinning process per core (LOAD_SPINNERS to
# choose how many), started here and stopped here by their own pids, whatever the command does.
# The suite under load, as issue #17 asks: bash scripts/under_load.sh bash scripts/test.sh -q
# The command sees the spinners' pids in LOAD_PIDS; its exit status is this script's.
set -uo pipefail
if [ $# -eq 0 ]; then
    echo "usage: bash scripts/under_load.sh COMMAND [ARGS...]" >&2
    exit 2
fi
count="${LOAD_SPINNERS:-$(nproc)}"
pids=()
stop_spinners() {
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
}
trap stop_spinners EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$count"); do
    (while :; do :; done) &
    pids+=("$!")
done
echo "under_load: $count spinning process(es): ${pids[*]}" >&2
LOAD_PIDS="${pids[*]}" "$@"
