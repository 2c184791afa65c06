#!/usr/bin/env bash
# Everything the GPU issue needs to run on the GPU, in one call (torch + deps installed, no network):
# the cuda tests, the GPU matrix, a repeat of two cells (do two runs agree within their spread?), the
# large model that must run out of memory in full FP32, and the fp16 underflow sweep. Files go to
# $OUT (default results/), named after the GPU and the date: 6 files, under the 8 a device call
# brings back. Rows are fsync'ed as each cell ends, so a run cut short still returns its rows.
# validate / claims / compare / report need no GPU: run them afterwards on the returned files.
#
#   OUT=/some/dir scripts/gpu_check.sh      (about 7-9 minutes on an H200)
#   STAGES="large underflow" scripts/gpu_check.sh   (a subset, to split the work over two calls)
set -u
STAGES=${STAGES:-"tests matrix repeat large underflow"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # no install needed; forked cells inherit it
export COLUMNS=200
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')
tag="$gpu-$(date -u +%Y-%m-%d)"
lb="python3 -m lorabench"
log="$OUT/$tag-log.txt"
{
  echo "== stages: $STAGES"
  echo "== versions"
  python3 -c "import torch, click, rich, yaml, pandas, pynvml, pytest; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" \
    || echo "== MISSING DEPENDENCY"
  echo "== nvidia-smi"; nvidia-smi
} >> "$log" 2>&1
if want tests; then
  echo "== pytest -m cuda" >> "$log"
  timeout 240 python3 -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider 2>&1 | tail -40 >> "$log"
fi
if want matrix; then
  echo "== matrix" >> "$log"
  timeout 420 $lb run scenarios/matrix.yaml --out "$OUT/$tag-matrix.jsonl" >> "$log" 2>&1
fi
if want repeat; then
  echo "== repeat of two cells (spread check)" >> "$log"
  timeout 60 $lb run scenarios/matrix.yaml --cells fp32-full,bf16-r8-bf16base --out "$OUT/$tag-matrix-repeat.jsonl" >> "$log" 2>&1
fi
if want large; then
  echo "== matrix-large" >> "$log"
  timeout 240 $lb run scenarios/matrix-large.yaml --out "$OUT/$tag-matrix-large.jsonl" >> "$log" 2>&1
fi
if want underflow; then
  echo "== underflow" >> "$log"
  timeout 90 $lb underflow scenarios/matrix.yaml --cell fp16-full --format json > "$OUT/$tag-underflow-fp16-full.json" 2>> "$log"
fi
rm -f "$OUT/$tag-matrix-repeat.csv" "$OUT/$tag-matrix-large.csv"
ls -la "$OUT" >> "$log"
