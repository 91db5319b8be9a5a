"""Options, markers and session fixtures shared by every suite (pytest plugin hooks)."""

from __future__ import annotations

import pytest
import torch
from tabulate import tabulate

DEFAULT_MODEL = "smollm2-135m"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption("--gpu", action="store_true", help="run the suites on CUDA (a usage error when none is visible)")
    group.addoption(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model under test: a local HF directory or an embedded name (default: {DEFAULT_MODEL})",
    )
    group.addoption(
        "--update-baselines",
        action="store_true",
        help="rewrite the stored baselines of the cases that ran (review the diff before committing)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--gpu") and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--gpu was given but no CUDA device is visible: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Run without --gpu for the CPU suites, or install a CUDA build of torch on a GPU machine."
        )
    config.harness_metrics = {}  # case id -> {metric: value}, filled through the `metrics` fixture


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run with --gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """Where the suites compute: ``cuda`` under ``--gpu``, else ``cpu``."""
    return torch.device("cuda" if pytestconfig.getoption("--gpu") else "cpu")


class MetricsRecorder:
    """Collects a case's key numbers for the end-of-run summary table."""

    def __init__(self, store: dict[str, dict[str, float]], case_id: str) -> None:
        self._store = store
        self._case_id = case_id

    def record(self, **values: float) -> None:
        self._store.setdefault(self._case_id, {}).update(values)


@pytest.fixture
def metrics(request: pytest.FixtureRequest) -> MetricsRecorder:
    """``metrics.record(sqnr_db=...)`` puts a case's numbers into the run's summary table."""
    return MetricsRecorder(request.config.harness_metrics, request.node.nodeid.split("::", 1)[-1])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    recorded = getattr(config, "harness_metrics", {})
    if not recorded:
        return
    columns = sorted({k for values in recorded.values() for k in values})
    rows = [[case, *(values.get(c, "") for c in columns)] for case, values in sorted(recorded.items())]
    terminalreporter.write_sep("=", "harness metrics")
    terminalreporter.write_line(tabulate(rows, headers=["case", *columns], floatfmt=".4g"))
