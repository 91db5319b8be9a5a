"""Options, markers and session fixtures shared by every suite (pytest plugin hooks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tabulate import tabulate

from harness.baselines import (
    BaselineError,
    baseline_path,
    comparison_table,
    cpu_fallback,
    paired_gate_table,
    read_baseline_file,
    tolerance_for,
    write_baselines,
)
from harness.models import DEFAULT_MODEL, model_key
from harness.testing import format_marker_lines, worker_device

BASELINES = Path(__file__).parent / "baselines"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption("--gpu", action="store_true", help="run the suites on CUDA (a usage error when none is visible)")
    group.addoption(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model under test: a local HF directory or an embedded name (default: {DEFAULT_MODEL})",
    )
    group.addoption(
        "--gsm8k-dir",
        default=None,
        help="folder with GSM8K test.jsonl/train.jsonl (default: $HARNESS_GSM8K_DIR)",
    )
    group.addoption(
        "--gsm8k-limit",
        type=int,
        default=None,
        help="GSM8K test items of the lm-eval accuracy cases (default: 250 with --gpu; the CPU cases use fixed sizes)",
    )
    group.addoption(
        "--update-baselines",
        action="store_true",
        help="rewrite the stored baselines of the cases that ran (review the diff before committing)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in format_marker_lines():  # a format's marker comes with its registry entry
        config.addinivalue_line("markers", marker)
    if config.getoption("--gpu") and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--gpu was given but no CUDA device is visible: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Run without --gpu for the CPU suites, or install a CUDA build of torch on a GPU machine."
        )
    if config.getoption("--update-baselines") and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(
            "--update-baselines writes the baseline files at the end of one session: run it without -n "
            f"(got -n {config.option.numprocesses})"
        )
    config.harness_metrics = {}  # case id -> {metric: value}, filled through the `metrics` fixture
    config.harness_baseline_updates = {}  # nodeid -> (path, case id, metrics), written at the end


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run with --gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """Where the suites compute: under ``--gpu`` one CUDA device per pytest-xdist worker
    (``pytest -n 4 --gpu`` spreads the cases over 4 GPUs), else ``cpu``."""
    gpu = pytestconfig.getoption("--gpu")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "master")
    dev = worker_device(worker, gpu, torch.cuda.device_count() if gpu else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


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


class BaselineCheck:
    """``baseline.check(case_id, metrics)`` compares a case with ``baselines/<model>/<device>/<suite>.json``."""

    def __init__(self, request: pytest.FixtureRequest, device: torch.device) -> None:
        config = request.config
        self._config, self._nodeid = config, request.node.nodeid
        suite = Path(str(request.node.path)).parent.name
        self.path = baseline_path(BASELINES, model_key(config.getoption("--model")), device.type, suite)
        self.update = config.getoption("--update-baselines")

    def check(self, case_id: str, metrics: dict[str, float], items: dict[str, list[float]] | None = None) -> None:
        """Metrics with per-item ``items`` (accuracy) are judged by a paired significance gate
        against the stored items; the others by their tolerance."""
        metrics = {k: float(v) for k, v in metrics.items()}
        items = {k: [float(x) for x in v] for k, v in (items or {}).items()}
        try:
            stored, stored_items = read_baseline_file(self.path)
        except BaselineError as err:
            pytest.fail(str(err), pytrace=False)
        if self.update:
            self._config.harness_baseline_updates[self._nodeid] = (
                self.path,
                case_id,
                metrics,
                stored.get(case_id),
                items or None,
            )
            return
        tolerance, source = tolerance_for, self.path
        if case_id not in stored and (fallback := cpu_fallback(self.path, case_id)):
            source, stored, stored_items, tolerance = fallback
        if case_id not in stored:
            gpu = " --gpu" if "cuda" in str(self.path) else ""
            pytest.fail(
                f"no baseline for case {case_id!r} in {self.path}; create it with:\n"
                f"    pytest '{self._nodeid}' --model {self._config.getoption('--model')}{gpu} --update-baselines",
                pytrace=False,
            )
        gated = set(items)
        ok, table = comparison_table(
            {k: v for k, v in stored[case_id].items() if k not in gated},
            {k: v for k, v in metrics.items() if k not in gated},
            tolerance,
        )
        if items:
            paired_ok, paired = paired_gate_table(stored_items.get(case_id, {}), items)
            ok, table = ok and paired_ok, f"{table}\n\nper-item, paired against the baseline's items:\n{paired}"
        if not ok:
            pytest.fail(f"{case_id} moved beyond tolerance against {source}:\n{table}", pytrace=False)


@pytest.fixture
def baseline(request: pytest.FixtureRequest, device: torch.device) -> BaselineCheck:
    return BaselineCheck(request, device)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.when == "call" and report.failed:  # never store numbers from a failing case
        item.config.harness_baseline_updates.pop(item.nodeid, None)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    updates: dict[Path, dict[str, dict[str, float]]] = {}
    item_updates: dict[Path, dict[str, dict[str, list[float]]]] = {}
    for path, case_id, metrics, _, items in getattr(session.config, "harness_baseline_updates", {}).values():
        updates.setdefault(path, {})[case_id] = metrics
        if items:
            item_updates.setdefault(path, {})[case_id] = items
    for path, cases in updates.items():
        write_baselines(path, cases, item_updates.get(path))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    updates = getattr(config, "harness_baseline_updates", {})
    if updates:
        terminalreporter.write_sep("=", "baselines updated (review the diff before committing)")
        for path, case_id, metrics, old, _ in updates.values():
            terminalreporter.write_line(f"{path} :: {case_id}")
            terminalreporter.write_line(comparison_table(old or {}, metrics)[1])
    recorded = getattr(config, "harness_metrics", {})
    if not recorded:
        return
    columns = sorted({k for values in recorded.values() for k in values})
    rows = [[case, *(values.get(c, "") for c in columns)] for case, values in sorted(recorded.items())]
    terminalreporter.write_sep("=", "harness metrics")
    terminalreporter.write_line(tabulate(rows, headers=["case", *columns], floatfmt=".4g"))
