#!/usr/bin/env bash
# The GPU check in one command, on any CUDA box (< 3 min on one H100):
#   bash ci/gpu-check.sh            # PY=python3 to use another interpreter
# 1. the formats suite on CUDA (--gpu), spread over CPU workers with pytest-xdist: every fast
#    kernel compiled for this GPU against the CPU reference path, bit for bit;
# 2. the bandwidth table (benchmarks/bandwidth.py): every format, fp32 and bf16, 8192x8192,
#    time / clone of the same tensor (triton.testing.do_bench), GB/s, bits vs the CPU reference;
#    record it as docs/measurements/DATE-GPU.md with the GPU's name and the versions;
# 3. the tiny-model suites (random tiny-llama / tiny-qwen2, no download) with --gpu; the one scan
#    case whose expected recommendation is derived from SmolLM2's weights is left out.
# The exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PY:-${HARNESS_VENV:-.venv}/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
"$py" -m pytest suites/formats --gpu -n "${WORKERS:-8}" -q -p no:cacheprovider || status=1
"$py" -m benchmarks.bandwidth --device cuda --size 8192 --dtypes fp32 bf16 --check || status=1
"$py" -m pytest suites/model/test_injection.py suites/srdd/test_scans.py --gpu --model tiny-llama \
    -m "not slow and not bench" -q -p no:cacheprovider \
    --deselect suites/srdd/test_scans.py::test_mxfp4_weights_recommend_a_milder_format || status=1
exit "$status"
