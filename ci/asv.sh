#!/usr/bin/env bash
# asv history in one command: record results for the given commits (default: HEAD) in the current
# environment, then build the HTML pages (.asv/html/index.html, served by `asv preview`), with
# their scripts and styles served from the pages' own folder so they work without internet.
#   bash ci/asv.sh                 # the checked-out code, recorded as HEAD
#   bash ci/asv.sh HEAD~1 HEAD     # each commit's code (from a temporary git worktree), same env
# Extra asv arguments go in ASV_ARGS, e.g. ASV_ARGS="--bench FakeQuantize --quick".
set -euo pipefail
cd "$(dirname "$0")/.."
py="${HARNESS_VENV:-.venv}/bin/python"
"$py" -m asv machine --yes >/dev/null
tmp="$(mktemp -d)"
trap 'git worktree prune; rm -rf "$tmp"' EXIT
for ref in "${@:-HEAD}"; do
    hash="$(git rev-parse "$ref")"
    src="$PWD"
    if [ "$#" -gt 0 ]; then  # an explicit commit: run its code, not the working tree's
        src="$tmp/$hash"
        git worktree add --detach "$src" "$hash" >/dev/null
    fi
    HARNESS_SOURCE="$src" "$py" -c "import benchmarks, harness; print('asv: recording $ref ($hash), harness from', harness.__file__)"
    # shellcheck disable=SC2086
    HARNESS_SOURCE="$src" "$py" -m asv run --python=same --set-commit-hash "$hash" ${ASV_ARGS:-}
done
"$py" -m asv publish
"$py" ci/asv_offline.py .asv/html  # jQuery, flot, bootstrap from ci/asv-www/, not CDNs: opens offline
echo "asv: pages in .asv/html/index.html (open them through \`asv preview\` or any local web server)"
