"""The harness as a pytest plugin (``pytest11`` entry point ``harness.pytest_plugin``): options,
markers and fixtures for gating a model or a format from any repository after ``pip install``.

Options: ``--gpu``, ``--model``, ``--dtype``, ``--trust-remote-code``, ``--gsm8k-dir``,
``--gsm8k-limit``, ``--update-baselines``, ``--baselines-dir``. Markers: one per format family
(generated from the format registry, :func:`harness.testing.format_marker`) plus ``srdd aqn
gsm8k bench slow gpu``. Fixtures: ``device``, ``model_under_test``, ``loss_items``,
``calibration_items``, ``baseline``, ``metrics``.

The entry point's name is this module's name, so ``-p harness.pytest_plugin`` or
``pytest_plugins = ["harness.pytest_plugin"]`` next to the installed entry point is a no-op,
never a second registration of the options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tabulate import tabulate
from torch import nn

from harness.baselines import (
    BaselineError,
    baseline_path,
    check_values,
    comparison_table,
    cpu_fallback,
    read_baseline_file,
    tolerance_for,
    write_baselines,
)
from harness.formats import list_formats
from harness.gate import INCONCLUSIVE, PASS, gate_table, worst_outcome
from harness.gsm8k import CALIBRATION_ITEMS, LOSS_ITEMS, Gsm8kItem, load_gsm8k
from harness.models import DEFAULT_MODEL, DTYPE_IDS, DTYPES, load_model, model_identity, model_key
from harness.peritem import DocumentError, PerItemDocument, per_item_values
from harness.testing import format_marker, worker_device

MARKERS = {
    "srdd": "SRDD detector and scan cases",
    "aqn": "AQN noise and schedule cases",
    "gsm8k": "GSM8K evaluation cases (lm-eval)",
    "bench": "speed benchmarks (pytest-benchmark)",
    "slow": "cases that take more than ~20 s on a 2-core CPU",
    "gpu": "cases that need CUDA; run only with --gpu",
}


def format_markers() -> dict[str, str]:
    """``{marker: description}`` for every format family of the registry (``mxfp6``: cases of
    mxfp6_e2m3 and mxfp6_e3m2), so a new format's marker is registered with no list to edit."""
    families: dict[str, list[str]] = {}
    for name in list_formats():
        families.setdefault(format_marker(name), []).append(name)
    return {marker: f"cases of {' and '.join(names)}" for marker, names in families.items()}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption("--gpu", action="store_true", help="run the suites on CUDA (a usage error when none is visible)")
    group.addoption(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model under test: a local HF directory or an embedded name (default: {DEFAULT_MODEL})",
    )
    group.addoption(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="dtype the model under test is loaded in (default: float32; others keep their baselines in "
        "<device>-<dtype> folders)",
    )
    group.addoption(
        "--trust-remote-code", action="store_true", help="allow a --model directory that ships its own modelling code"
    )
    group.addoption(
        "--gsm8k-dir",
        default=None,
        help="folder with GSM8K test.jsonl/train.jsonl (default: $HARNESS_GSM8K_DIR, else the packaged copy)",
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
    group.addoption(
        "--accept-inconclusive",
        action="store_true",
        help="let a paired gate that can neither show a regression nor rule one out pass (default: it fails)",
    )
    group.addoption(
        "--baselines-dir",
        default=None,
        help="root of the stored baselines, <root>/<model>/<device>/<suite>.json (default: baselines/ in the "
        "rootdir, the folder of pytest.ini/pyproject.toml)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker, description in {**format_markers(), **MARKERS}.items():
        config.addinivalue_line("markers", f"{marker}: {description}")
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


def baselines_root(config: pytest.Config) -> Path:
    """``--baselines-dir`` (relative to the invocation directory), else ``<rootdir>/baselines``."""
    explicit = config.getoption("--baselines-dir")
    return Path(config.invocation_params.dir, explicit) if explicit else config.rootpath / "baselines"


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


@dataclass(frozen=True)
class ModelUnderTest:
    """The ``--model`` of the session, loaded once in ``--dtype`` on ``device``, in eval mode."""

    name: str  # as given to --model
    key: str  # its short name in baselines/ and reports (models.model_key)
    model: nn.Module
    tokenizer: object
    dtype: str  # a key of harness.models.DTYPES

    @property
    def dtype_id(self) -> str:
        """The dtype's short name that ends the suites' case ids (``mxfp4-w4a16-fp32``), so a
        ``--dtype bfloat16`` run has ``-bf16`` cases (in ``<device>-bfloat16`` baselines)."""
        return DTYPE_IDS[self.dtype]


@pytest.fixture(scope="session")
def model_under_test(pytestconfig: pytest.Config, device: torch.device) -> ModelUnderTest:
    """``--model`` (default: the embedded SmolLM2-135M) loaded with ``--dtype`` and ``--trust-remote-code``."""
    name, dtype = pytestconfig.getoption("--model"), pytestconfig.getoption("--dtype")
    model, tok = load_model(
        name, dtype=DTYPES[dtype], device=device, trust_remote_code=pytestconfig.getoption("--trust-remote-code")
    )
    pytestconfig.harness_model_identity = model_identity(model)  # what the baseline files record and check
    return ModelUnderTest(name, model_key(name), model, tok, dtype)


@pytest.fixture(scope="session")
def loss_items(pytestconfig: pytest.Config) -> list[Gsm8kItem]:
    """The first 32 GSM8K test items: the loss/KL evaluation set."""
    return load_gsm8k("test", LOSS_ITEMS, pytestconfig.getoption("--gsm8k-dir"))


@pytest.fixture(scope="session")
def calibration_items(pytestconfig: pytest.Config) -> list[Gsm8kItem]:
    """The first 32 GSM8K train items: calibration texts for scans."""
    return load_gsm8k("train", CALIBRATION_ITEMS, pytestconfig.getoption("--gsm8k-dir"))


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
    """``baseline.check(case_id, metrics)`` compares a case with ``<baselines>/<model>/<device>/<suite>.json``
    (``<suite>``: the test file's folder name; ``<device>-<dtype>`` for a ``--dtype`` other than float32)."""

    def __init__(self, request: pytest.FixtureRequest, device: torch.device) -> None:
        config = request.config
        self._config, self._nodeid = config, request.node.nodeid
        suite = Path(str(request.node.path)).parent.name
        dtype = config.getoption("--dtype")
        folder = device.type if dtype == "float32" else f"{device.type}-{dtype}"
        self.path = baseline_path(baselines_root(config), model_key(config.getoption("--model")), folder, suite)
        self.update = config.getoption("--update-baselines")

    def check(
        self, case_id: str, metrics: dict[str, float], items: dict[str, list[float]] | PerItemDocument | None = None
    ) -> None:
        """Metrics with per-item ``items`` (accuracy; a mapping or a per-item document, read by
        :func:`harness.peritem.per_item_values`) are judged by the paired gate against the stored
        items (a diverged item fails, also with ``--accept-inconclusive``); the others by their tolerance."""
        metrics = {k: float(v) for k, v in metrics.items()}
        try:
            items = per_item_values(items.per_item if isinstance(items, PerItemDocument) else items) if items else {}
            check_values(case_id, metrics, items)
            identity = getattr(self._config, "harness_model_identity", None)
            stored, stored_items = read_baseline_file(self.path, identity)
        except (BaselineError, DocumentError) as err:
            pytest.fail(f"{case_id}: {err}" if isinstance(err, DocumentError) else str(err), pytrace=False)
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
        if case_id not in stored and (fallback := cpu_fallback(self.path, case_id, identity)):
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
            results, paired = gate_table(stored_items.get(case_id, {}), items)
            accepted = (PASS, INCONCLUSIVE) if self._config.getoption("--accept-inconclusive") else (PASS,)
            ok &= worst_outcome(results) in accepted
            table = f"{table}\n\nper-item, paired against the baseline's items:\n{paired}"
            print(paired)  # every outcome with its evidence, also when it passes (shown with -rA / -s)
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
        write_baselines(path, cases, item_updates.get(path), getattr(session.config, "harness_model_identity", None))


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
