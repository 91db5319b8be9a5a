#!/usr/bin/env bash
# The nightly GPU job (ci/nightly-gpu.yml calls it; runnable by hand on any GPU box):
#   MODEL=/path/to/Qwen2.5-1.5B-Instruct bash ci/nightly-gpu.sh
# 1. every MXFP4 case of every suite on CUDA against the model's cuda baselines (GPUS=N spreads
#    them over N GPUs with pytest-xdist, one GPU per worker);
# 2. the GSM8K accuracy gate (5-shot exact match, paired McNemar against the stored per-item
#    baseline; GSM8K_LIMIT items, default 250);
# 3. an SRDD scan + report of the model under MXFP4;
# 4. asv: record this commit and rebuild the history pages.
# Everything lands in reports/nightly/ and .asv/html/; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:?set MODEL to the model directory (or smollm2-135m)}"
py="${HARNESS_VENV:-.venv}/bin/python"
out=reports/nightly
mkdir -p "$out"
status=0
"$py" -m pytest suites/ -m "mxfp4 and not gsm8k" --gpu --model "$model" -n "${GPUS:-1}" \
    --junitxml="$out/suites.xml" || status=1
"$py" -m pytest suites/gsm8k -m gpu --gpu --model "$model" --gsm8k-limit "${GSM8K_LIMIT:-250}" \
    --junitxml="$out/gsm8k.xml" || status=1
"$py" -m harness scan --model "$model" --format mxfp4 --point weight --device cuda \
    --output "$out/scan-mxfp4/results.json" --report-dir "$out/scan-mxfp4" || status=1
bash ci/asv.sh || status=1
exit "$status"
