#!/bin/bash
# Kill a `spikequant search` with kill -9 once N probes are saved, resume it, and compare its ratios.json
# with an uninterrupted run's.  Usage: bench/gbs_killtest.sh OUT_DIR REFERENCE_DIR N -- SEARCH_ARGS...
# (SEARCH_ARGS: the reference run's arguments without --output).  Run from the repository root.
set -u
OUT=$1; REF=$2; N=$3; shift 4
rm -rf "$OUT"
.venv/bin/spikequant search "$@" --output "$OUT" --no-progress &
PID=$!
while true; do
  n=$(python3 -c "import json;print(json.load(open('$OUT/state.json'))['counters']['probes'])" 2>/dev/null || echo 0)
  if [ "$n" -ge "$N" ]; then kill -9 $PID; echo "killed pid $PID with kill -9 after $n saved probes"; break; fi
  if ! kill -0 $PID 2>/dev/null; then echo "the search ended before $N probes"; exit 1; fi
  sleep 0.2
done
wait $PID; echo "exit status $?"
.venv/bin/spikequant search "$@" --output "$OUT" --no-progress --resume
cmp "$OUT/ratios.json" "$REF/ratios.json" && echo "ratios.json identical to the uninterrupted run"
sha256sum "$OUT/ratios.json" "$REF/ratios.json"
