"""One GPU per pytest-xdist worker, checked with fake device counts on CPU."""

from __future__ import annotations

import pytest
import torch

from harness.testing import worker_device


def test_workers_spread_over_the_gpus_round_robin() -> None:
    got = [worker_device(f"gw{i}", True, 4) for i in range(6)]
    assert got == [torch.device("cuda", i) for i in (0, 1, 2, 3, 0, 1)]
    assert worker_device("master", True, 8) == torch.device("cuda", 0)  # no xdist: the first GPU


def test_cpu_runs_stay_on_cpu_whatever_the_worker() -> None:
    assert worker_device("gw3", False, 0) == worker_device("master", False, 2) == torch.device("cpu")


def test_gpu_without_devices_is_an_error() -> None:
    with pytest.raises(ValueError, match="--gpu needs at least one CUDA device, found 0"):
        worker_device("gw0", True, 0)


def test_update_baselines_refuses_xdist(pytester: pytest.Pytester) -> None:
    from pathlib import Path

    pytester.makeconftest((Path(__file__).resolve().parents[1] / "conftest.py").read_text())
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-n", "2", "--harness-update-baselines", "-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*--harness-update-baselines writes the baseline files*without -n (got -n 2)*"])
    assert result.ret != 0
