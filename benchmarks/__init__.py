"""asv benchmarks (numpy/scipy layout). ``HARNESS_SOURCE``, set by ``ci/asv.sh`` when it records
an explicit commit, is that commit's checkout: its ``harness`` is imported instead of the one
installed in the environment (an editable install's import hook would otherwise win)."""

import os
import sys

_source = os.environ.get("HARNESS_SOURCE")
if _source:
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, _source)
