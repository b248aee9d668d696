#!/usr/bin/env bash
# Device call 2 of 2 (bench/device/README.md), right after call 1 on the same machine: put the default
# model's GGUF together, then on the GPU: the README's main job (spikequant demo), the time of one
# fake-quantized forward, and GBS in exact mode (the paper's algorithm) on GPTQ W4A4KV4 and W3A3KV3,
# sized to the time left. Everything is written under $OUT (logs, summary, a tarball of the run folders).
set -u
START=$(date +%s); DEADLINE=$((START + ${BUDGET_S:-520}))
mkdir -p /tmp/smol /tmp/runs
cat /tmp/xfer/part-a .xfer/part-b > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
echo "${GGUF_SHA256}  /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - | tee "$OUT/summary.txt" || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
M=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf; D=/tmp/xfer/data; R=/tmp/runs
SQ=(python3 -m spikequant.cli)
step() {  # name timeout command...: the log to $OUT/all.log, one summary line with rc and seconds
  local name=$1 t=$2; shift 2; local s; s=$(date +%s)
  echo "### $name: $*" >> "$OUT/all.log"
  timeout "$t" "$@" >> "$OUT/all.log" 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$OUT/summary.txt"
}
left() { echo $((DEADLINE - $(date +%s))); }
step demo 150 "${SQ[@]}" demo --model $M --device cuda --data-dir $D --no-progress --output $R/demo
step probe 90 sh -c "python3 bench/device/probe_speed.py --model $M --device cuda --data-dir $D --shape 1 2048 --shape 2 2048 --shape 4 2048 > $R/probe.json"
cat $R/probe.json | tee -a "$OUT/summary.txt"
# Exact-mode cost: layers x 8 slots x (1 + T) whole-model passes; choose the calibration windows (of
# 2048 tokens, as the authors) so that one search fits in about 40 % of the time left (two searches + eval).
pick() { python3 - "$1" "$2" <<'PY'
import json, sys
probe = json.load(open("/tmp/runs/probe.json")); budget = float(sys.argv[1]); T = int(sys.argv[2])
for w in (4, 2, 1):
    if probe["layers"] * 8 * (1 + T) * probe["ms"][f"{w}x2048"] / 1000 <= budget:
        print(w); break
else:
    print(0)
PY
}
T=8
for bits in 4 3; do
  budget=$(( $(left) * 2 / 5 )); [ $bits = 3 ] && budget=$(( $(left) - 40 ))
  w=$(pick $budget $T)
  echo "w${bits}: $(left) s left, search budget ${budget} s -> ${w} x 2048 calibration tokens, T = $T" | tee -a "$OUT/summary.txt"
  [ "$w" = 0 ] && continue
  step gbs-exact-gptq-w${bits} $(( $(left) - 20 )) "${SQ[@]}" search --model $M --device cuda --recipe quarot-w${bits}a${bits}kv${bits} \
      --data-dir $D --calib-windows $w --seqlen 2048 --iterations $T --mode exact --eval-windows 16 --eval-seqlen 512 \
      --no-progress --output $R/gbs-exact-gptq-w${bits}
done
tar czf "$OUT/runs.tar.gz" -C $R . 2>/dev/null
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
