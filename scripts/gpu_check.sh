#!/usr/bin/env bash
# Everything the GPU issue needs, in one call on a GPU machine (torch + deps installed, no network):
# the cuda tests, the GPU matrix, the large model that must run out of memory in full FP32, the
# estimator held to the rows, a repeat of two cells (do two runs agree within their spread?) and the
# fp16 underflow sweep. Files go to $OUT (default results/), named after the GPU and the date;
# at most 8 files, so that a device session can bring them all back.
#
#   OUT=/some/dir scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD/src
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')
tag="$gpu-$(date -u +%Y-%m-%d)"
lb="python3 -m lorabench"
export COLUMNS=200
log="$OUT/$tag-log.txt"
{
  echo "== nvidia-smi"; nvidia-smi
  echo "== pytest -m cuda"; timeout 300 python3 -m pytest -m cuda -q -x 2>&1 | tail -30
} > "$log" 2>&1
$lb run scenarios/matrix.yaml --out "$OUT/$tag-matrix.jsonl" >> "$log" 2>&1
{
  echo "== validate"; $lb validate "$OUT/$tag-matrix.jsonl" --max-median-pct 2 --max-p95-pct 5
  echo "== claims"; $lb claims "$OUT/$tag-matrix.jsonl"
  echo "== repeat of two cells (spread check)"
} >> "$log" 2>&1
$lb run scenarios/matrix.yaml --cells fp32-full,bf16-r8-bf16base --out "$OUT/$tag-matrix-repeat.jsonl" >> "$log" 2>&1
$lb compare "$OUT/$tag-matrix.jsonl" "$OUT/$tag-matrix-repeat.jsonl" >> "$log" 2>&1
$lb run scenarios/matrix-large.yaml --out "$OUT/$tag-matrix-large.jsonl" >> "$log" 2>&1
$lb underflow scenarios/matrix.yaml --cell fp16-full --format json > "$OUT/$tag-underflow-fp16-full.json" 2>> "$log"
rm -f "$OUT/$tag-matrix-repeat.csv" "$OUT/$tag-matrix-large.csv"
ls -la "$OUT" >> "$log"
