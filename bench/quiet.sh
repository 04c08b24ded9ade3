#!/bin/bash
# Run "$@" with every nice-19 process paused (background jobs started with `nice -n 19`), so a measurement
# has the cores to itself on a shared machine. Jobs started at nice 19 while it runs are paused too (checked
# every 2 s); all of them continue when it ends.
#   bash bench/quiet.sh python bench/bench_inference.py --peer PEER
paused=$(mktemp)
pause_new() { ps -eo pid=,ni= | awk '$2==19{print $1}' | while read -r pid; do
    kill -STOP "$pid" 2>/dev/null && echo "$pid" >> "$paused"; done; }
pause_new
( while sleep 2; do pause_new; done ) &
watcher=$!
trap 'kill $watcher 2>/dev/null; sort -u "$paused" | xargs -r kill -CONT 2>/dev/null; rm -f "$paused"' EXIT
"$@"
