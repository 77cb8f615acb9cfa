#!/bin/bash
# Every benchmark, one after another (what `make bench` runs). Needs root (ptrace) and
# `make setup`. Prints the benchmarks' JSON lines on stdout (one per figure) and keeps a
# copy in tests/output/bench/results.jsonl; progress on stderr. Each benchmark has a
# time limit; the limits add up to 1420 s, so even a run where every benchmark
# hangs ends within 24 minutes (a normal run on 2 idle cores takes 2-5).
#
#   bench/run_all.sh            all of them
#   bench/run_all.sh pause fleet   only these (names below)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
py=$root/.venv/bin/python
[ -x "$py" ] || { echo "run_all: no $py: run 'make setup' first" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run_all: run as root (the benchmarks ptrace their patients)" >&2; exit 2; }
out=$root/tests/output/bench
mkdir -p "$out"
: > "$out/results.jsonl"

# name, time limit (s), command
benches=(
    "pause 60 $py $here/pause.py"
    "apply_wall 60 $py $here/apply_wall.py"
    "fleet 100 $py $here/fleet.py"
    "call_cost 60 $py $here/call_cost.py"
    "watch 120 $py $here/watch.py"
    "build_overhead 320 $here/build_overhead.sh"
    "build_overhead_cjson 200 $here/build_overhead_realproject.sh cjson"
    "build_overhead_tinyxml 200 $here/build_overhead_realproject.sh tinyxml"
    "build_overhead_nginx 300 $here/build_overhead_realproject.sh nginx"
)
wanted=("$@")
failed=0
for entry in "${benches[@]}"; do
    read -r name limit command <<< "$entry"
    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " $name " ]]; then
        continue
    fi
    echo "run_all: $name (limit ${limit}s)" >&2
    started=$(date +%s)
    # shellcheck disable=SC2086 # the command is words
    timeout --kill-after=10 "$limit" $command 2> "$out/$name.log" | tee -a "$out/results.jsonl"
    status=${PIPESTATUS[0]}
    echo "run_all: $name: exit $status in $(( $(date +%s) - started ))s (log: $out/$name.log)" >&2
    if [ "$status" != 0 ]; then
        tail -n 5 "$out/$name.log" >&2
        failed=1
    fi
done
exit $failed
