"""The harness as a pytest plugin (``pytest11`` entry point ``harness.pytest_plugin``): options,
markers and fixtures for gating a model or a format from any repository after ``pip install``.

It registers itself under the name ``harness``, so ``pytest -p no:harness`` turns it off
(options, markers, fixtures and hooks), also where a conftest names this module in
``pytest_plugins``; naming it next to the installed entry point is a no-op.

Options are namespaced, ``--harness-<name>`` (:data:`OPTIONS`: ``gpu model dtype
trust-remote-code gsm8k-dir gsm8k-limit update-baselines accept-inconclusive baselines-dir``),
so they never clash with a repository's own ``--model``. A repository that wants the short
names (``--gpu``, ``--model`` ...) opts in from its conftest: ``def pytest_addoption(parser):
add_short_options(parser)``. Markers: one per format family (from the format registry,
:func:`harness.testing.format_marker`) plus ``srdd aqn gsm8k bench slow gpu``. Fixtures:
``harness_device`` (and ``device``, the same, for the suites; a user's own ``device`` fixture
changes nothing of the plugin's), ``model_under_test``, ``loss_items``, ``calibration_items``,
``baseline``, ``metrics``. The session's state is one :class:`HarnessSession` in
``config.stash``."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tabulate import tabulate
from torch import nn

from harness.baseline_check import BaselineCheck
from harness.baselines import BaselineError, baseline_path, check_values, comparison_table, write_baselines
from harness.formats import list_formats
from harness.gsm8k import CALIBRATION_ITEMS, LOSS_ITEMS, Gsm8kItem, load_gsm8k
from harness.models import DEFAULT_MODEL, DTYPE_IDS, DTYPES, check_model_spec, load_model, model_identity, model_key
from harness.peritem import DocumentError, PerItemDocument, per_item_values
from harness.testing import format_marker, worker_device

NAME = "harness"  # the plugin's registration name: -p no:harness
PREFIX = "--harness-"
MARKERS = {
    "srdd": "SRDD detector and scan cases",
    "aqn": "AQN noise and schedule cases",
    "gsm8k": "GSM8K evaluation cases (lm-eval)",
    "bench": "speed benchmarks (pytest-benchmark)",
    "slow": "cases that take more than ~20 s on a 2-core CPU",
    "gpu": "cases that need CUDA; run only with --harness-gpu",
}
# name -> (argparse keywords, help); the option is --harness-<name>, its dest harness_<name>
OPTIONS: dict[str, tuple[dict, str]] = {
    "gpu": ({"action": "store_true"}, "run the suites on CUDA (a usage error when none is visible)"),
    "model": (
        {"default": DEFAULT_MODEL},
        f"model under test: a local HF directory or an embedded name (default: {DEFAULT_MODEL})",
    ),
    "dtype": (
        {"default": "float32", "choices": list(DTYPES)},
        "dtype the model under test is loaded in (default: float32; others keep their baselines in "
        "<device>-<dtype> folders)",
    ),
    "trust-remote-code": ({"action": "store_true"}, "allow a model directory that ships its own modelling code"),
    "gsm8k-dir": (
        {"default": None},
        "folder with GSM8K test.jsonl/train.jsonl (default: $HARNESS_GSM8K_DIR, else the packaged copy)",
    ),
    "gsm8k-limit": (
        {"type": int, "default": None},
        "GSM8K test items of the lm-eval accuracy cases (default: 250 with --harness-gpu; the CPU cases use "
        "fixed sizes)",
    ),
    "update-baselines": (
        {"action": "store_true"},
        "rewrite the stored baselines of the cases that passed (review the diff before committing)",
    ),
    "accept-inconclusive": (
        {"action": "store_true"},
        "let a paired gate that can neither show a regression nor rule one out pass (default: it fails)",
    ),
    "baselines-dir": (
        {"default": None},
        "root of the stored baselines, <root>/<model>/<device>/<suite>.json (default: baselines/ in the "
        "rootdir, the folder of pytest.ini/pyproject.toml/tox.ini/setup.cfg, else in the git/hg repository "
        "of the test file)",
    ),
}


def _dest(name: str) -> str:
    return "harness_" + name.replace("-", "_")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Registers :class:`HarnessPlugin` as ``harness`` unless ``-p no:harness`` blocked it or it
    is registered already (this module named twice: the entry point and a conftest)."""
    if not pluginmanager.is_blocked(NAME) and not pluginmanager.has_plugin(NAME):
        pluginmanager.register(HarnessPlugin(), NAME)


def add_short_options(parser: pytest.Parser, *names: str) -> None:
    """The opt-in short names: ``--<name>`` as an alias of ``--harness-<name>`` for each of
    ``names`` (default: every option), for a repository whose conftest defines none of them."""
    group = parser.getgroup("harness")
    for name in names or OPTIONS:
        group.addoption(f"--{name}", dest=_dest(name), help=f"the same as {PREFIX}{name}", **OPTIONS[name][0])


@dataclass(frozen=True)
class HarnessOptions:
    """The ``--harness-*`` options of a session."""

    gpu: bool
    model: str
    dtype: str  # a key of harness.models.DTYPES
    trust_remote_code: bool
    gsm8k_dir: str | None
    gsm8k_limit: int | None
    update_baselines: bool
    accept_inconclusive: bool
    baselines_dir: str | None

    @classmethod
    def from_config(cls, config: pytest.Config) -> HarnessOptions:
        return cls(**{name.replace("-", "_"): config.getoption(_dest(name)) for name in OPTIONS})


@dataclass(frozen=True)
class BaselineUpdate:
    """One ``baseline.check`` of a test under ``--harness-update-baselines``."""

    path: Path
    case_id: str
    metrics: dict[str, float]
    old: dict[str, float] | None
    items: dict[str, list[float]] | None


@dataclass
class HarnessSession:
    """The plugin's state for one pytest session, in ``config.stash`` (:meth:`from_config`)."""

    config: pytest.Config
    options: HarnessOptions
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> {metric: value}, for the summary
    model_identity: dict[str, object] | None = None  # of the loaded model: what baseline files record
    checked: dict[tuple[Path, str], str] = field(default_factory=dict)  # (file, case id) -> nodeid checking it
    pending: dict[str, list[BaselineUpdate]] = field(default_factory=dict)  # nodeid -> its checks while it runs
    updates: list[BaselineUpdate] = field(default_factory=list)  # checks of tests that passed
    written: list[Path] = field(default_factory=list)
    not_written: list[str] = field(default_factory=list)  # one line each
    interrupted: bool = False  # Ctrl-C while the baselines were written

    @classmethod
    def from_config(cls, config: pytest.Config) -> HarnessSession:
        return config.stash[SESSION]

    def baselines_root(self, test_file: Path) -> Path:
        """``--harness-baselines-dir`` (relative to the invocation directory), else
        ``<rootdir>/baselines`` when pytest found a configuration file (or ``--rootdir`` was
        given), else ``baselines/`` in the git or mercurial repository of the test file: one
        place per repository whatever the working directory."""
        config = self.config
        if self.options.baselines_dir:
            return Path(config.invocation_params.dir, self.options.baselines_dir).resolve()
        if config.inipath is not None or config.option.rootdir:
            return config.rootpath / "baselines"
        for folder in test_file.resolve().parents:
            if (folder / ".git").exists() or (folder / ".hg").exists():
                return folder / "baselines"
        raise BaselineError(
            f"cannot tell where the baselines of {test_file} live: no pytest.ini/pyproject.toml/tox.ini/setup.cfg "
            "and no git or mercurial repository above it; pass --harness-baselines-dir"
        )

    def create_command(self, item: pytest.Item) -> str:
        """The command that stores ``item``'s baselines as this session would compare them:
        every option that changes the numbers or where they are stored, cwd-independent."""
        o, here = self.options, self.config.invocation_params.dir
        test = f"{item.path}::{item.nodeid.split('::', 1)[1]}" if "::" in item.nodeid else str(item.path)
        model = str(Path(here, o.model).resolve()) if Path(here, o.model).exists() else o.model
        args = ["pytest", test, f"{PREFIX}model", model]
        if o.dtype != "float32":
            args += [f"{PREFIX}dtype", o.dtype]
        args += [f"{PREFIX}gpu"] * o.gpu + [f"{PREFIX}trust-remote-code"] * o.trust_remote_code
        if o.baselines_dir:
            args += [f"{PREFIX}baselines-dir", str(Path(here, o.baselines_dir).resolve())]
        if o.gsm8k_dir:
            args += [f"{PREFIX}gsm8k-dir", str(Path(here, o.gsm8k_dir).resolve())]
        if o.gsm8k_limit is not None:
            args += [f"{PREFIX}gsm8k-limit", str(o.gsm8k_limit)]
        return shlex.join([*args, f"{PREFIX}update-baselines"])

    def write_updates(self) -> None:
        """Writes the checks of the tests that passed, one file at a time (each all-or-nothing),
        noting what was and was not written; stops at Ctrl-C."""
        by_file: dict[Path, tuple[dict, dict]] = {}
        for update in self.updates:
            cases, items = by_file.setdefault(update.path, ({}, {}))
            cases[update.case_id] = update.metrics
            if update.items:
                items[update.case_id] = update.items
        files = list(by_file)
        for i, path in enumerate(files):
            try:
                write_baselines(path, by_file[path][0], by_file[path][1] or None, self.model_identity)
                self.written.append(path)
            except (OSError, BaselineError) as err:
                self.not_written.append(str(err))
            except KeyboardInterrupt:
                self.not_written += [f"{p}: not written (interrupted)" for p in files[i:]]
                self.interrupted = True
                return


SESSION = pytest.StashKey[HarnessSession]()


@dataclass(frozen=True)
class ModelUnderTest:
    """The ``--harness-model`` of the session, loaded once in ``--harness-dtype`` on the device,
    in eval mode."""

    name: str  # as given to --harness-model
    key: str  # its short name in baselines/ and reports (models.model_key)
    model: nn.Module
    tokenizer: object
    dtype: str  # a key of harness.models.DTYPES

    @property
    def dtype_id(self) -> str:
        """The dtype's short name that ends the suites' case ids (``mxfp4-w4a16-fp32``), so a
        ``--harness-dtype bfloat16`` run has ``-bf16`` cases (in ``<device>-bfloat16`` baselines)."""
        return DTYPE_IDS[self.dtype]


class MetricsRecorder:
    """Collects a case's key numbers for the end-of-run summary table."""

    def __init__(self, store: dict[str, dict[str, float]], case_id: str) -> None:
        self._store = store
        self._case_id = case_id

    def record(self, **values: float) -> None:
        self._store.setdefault(self._case_id, {}).update(values)


class Baseline:
    """``baseline.check(case_id, metrics)`` compares a case with ``<baselines>/<model>/<device>/<suite>.json``
    (``<suite>``: the test file's folder name; ``<device>-<dtype>`` for a dtype other than float32);
    under ``--harness-update-baselines`` it records the case, stored if the test passes."""

    def __init__(self, item: pytest.Item, device: torch.device) -> None:
        self._session, self._item = HarnessSession.from_config(item.config), item
        o = self._session.options
        folder = device.type if o.dtype == "float32" else f"{device.type}-{o.dtype}"
        root = _or_fail(self._session.baselines_root, item.path)
        self.path = baseline_path(root, model_key(o.model), folder, item.path.parent.name)
        self.update = o.update_baselines

    def check(
        self, case_id: str, metrics: dict[str, float], items: dict[str, list[float]] | PerItemDocument | None = None
    ) -> None:
        """Metrics with per-item ``items`` (accuracy; a mapping or a per-item document, read by
        :func:`harness.peritem.per_item_values`) are judged by the paired gate against the stored
        items (a diverged item fails, also with ``--harness-accept-inconclusive``); the others by
        their tolerance. A case id checked by two tests (or twice by one) of the same baseline
        file is refused."""
        session, nodeid = self._session, self._item.nodeid
        metrics = {k: float(v) for k, v in metrics.items()}
        try:
            items = per_item_values(items.per_item if isinstance(items, PerItemDocument) else items) if items else {}
        except DocumentError as err:
            pytest.fail(f"{case_id}: {err}", pytrace=False)
        policy = BaselineCheck(
            self.path, session.model_identity, session.options.accept_inconclusive, session.create_command(self._item)
        )
        key = (self.path, case_id)
        other = session.checked.setdefault(key, nodeid)
        twice = other == nodeid and any(u.case_id == case_id for u in session.pending.get(nodeid, []))
        if other != nodeid or twice:
            by = "twice by this test" if twice else f"also by {other}"
            pytest.fail(
                f"case id {case_id!r} of {self.path} is checked {by}: each check needs its own case id "
                "(one would overwrite the other's baseline)",
                pytrace=False,
            )
        _or_fail(check_values, case_id, metrics, items)
        if self.update:
            old = _or_fail(policy.stored, case_id)
            update = BaselineUpdate(self.path, case_id, metrics, old, items or None)
            session.pending.setdefault(nodeid, []).append(update)
            return
        table = _or_fail(policy.judge, case_id, metrics, items)
        if items:
            print(table)  # every outcome with its evidence, also when it passes (shown with -rA / -s)


def _or_fail(function, *args):
    """``function(*args)``; a BaselineError fails the test with its message alone."""
    try:
        return function(*args)
    except BaselineError as err:
        message = str(err)
    pytest.fail(message, pytrace=False)


class HarnessPlugin:
    """The hooks and fixtures (registered as ``harness`` by :func:`pytest_addhooks`); the
    fixtures are class methods, as pytest wants those of a plugin object."""

    def pytest_addoption(self, parser: pytest.Parser) -> None:
        group = parser.getgroup("harness")
        for name, (kwargs, help) in OPTIONS.items():
            group.addoption(f"{PREFIX}{name}", dest=_dest(name), help=help, **kwargs)

    def pytest_configure(self, config: pytest.Config) -> None:
        for marker, description in {**format_markers(), **MARKERS}.items():
            config.addinivalue_line("markers", f"{marker}: {description}")
        options = HarnessOptions.from_config(config)
        if options.gpu and not torch.cuda.is_available():
            raise pytest.UsageError(
                "--harness-gpu was given but no CUDA device is visible: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
                "Run without it for the CPU suites, or install a CUDA build of torch on a GPU machine."
            )
        if options.update_baselines and getattr(config.option, "numprocesses", None):
            raise pytest.UsageError(
                "--harness-update-baselines writes the baseline files at the end of one session: run it without -n "
                f"(got -n {config.option.numprocesses})"
            )
        try:
            check_model_spec(options.model, options.trust_remote_code)
        except ValueError as err:
            raise pytest.UsageError(f"--harness-model: {err}") from None
        config.stash[SESSION] = HarnessSession(config, options)

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if HarnessSession.from_config(config).options.gpu:
            return
        skip_gpu = pytest.mark.skip(reason="needs CUDA: run with --harness-gpu on a GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)

    @pytest.fixture(scope="session")
    @classmethod
    def harness_device(cls, pytestconfig: pytest.Config) -> torch.device:
        """Where the suites compute: under ``--harness-gpu`` one CUDA device per pytest-xdist
        worker (``pytest -n 4 --harness-gpu`` spreads the cases over 4 GPUs), else ``cpu``."""
        gpu = HarnessSession.from_config(pytestconfig).options.gpu
        worker = os.environ.get("PYTEST_XDIST_WORKER", "master")
        dev = worker_device(worker, gpu, torch.cuda.device_count() if gpu else 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    @pytest.fixture(scope="session")
    @classmethod
    def device(cls, harness_device: torch.device) -> torch.device:
        """The suites' name for :func:`harness_device` (a repository's own ``device`` replaces
        this one only)."""
        return harness_device

    @pytest.fixture(scope="session")
    @classmethod
    def model_under_test(cls, pytestconfig: pytest.Config, harness_device: torch.device) -> ModelUnderTest:
        """``--harness-model`` (default: the embedded SmolLM2-135M) loaded with ``--harness-dtype``
        and ``--harness-trust-remote-code``."""
        session = HarnessSession.from_config(pytestconfig)
        o = session.options
        model, tok = load_model(
            o.model, dtype=DTYPES[o.dtype], device=harness_device, trust_remote_code=o.trust_remote_code
        )
        session.model_identity = model_identity(model)  # what the baseline files record and check
        return ModelUnderTest(o.model, model_key(o.model), model, tok, o.dtype)

    @pytest.fixture(scope="session")
    @classmethod
    def loss_items(cls, pytestconfig: pytest.Config) -> list[Gsm8kItem]:
        """The first 32 GSM8K test items: the loss/KL evaluation set."""
        return load_gsm8k("test", LOSS_ITEMS, HarnessSession.from_config(pytestconfig).options.gsm8k_dir)

    @pytest.fixture(scope="session")
    @classmethod
    def calibration_items(cls, pytestconfig: pytest.Config) -> list[Gsm8kItem]:
        """The first 32 GSM8K train items: calibration texts for scans."""
        return load_gsm8k("train", CALIBRATION_ITEMS, HarnessSession.from_config(pytestconfig).options.gsm8k_dir)

    @pytest.fixture
    @classmethod
    def metrics(cls, request: pytest.FixtureRequest) -> MetricsRecorder:
        """``metrics.record(sqnr_db=...)`` puts a case's numbers into the run's summary table."""
        case = request.node.nodeid.split("::", 1)[-1]
        return MetricsRecorder(HarnessSession.from_config(request.config).metrics, case)

    @pytest.fixture
    @classmethod
    def baseline(cls, request: pytest.FixtureRequest, harness_device: torch.device) -> Baseline:
        """``baseline.check(case_id, metrics)``: see :class:`Baseline`."""
        return Baseline(request.node, harness_device)

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        HarnessSession.from_config(item.config).pending.pop(item.nodeid, None)  # a rerun starts afresh

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        """A test's checks are stored only when it passed: not when it failed, errored in
        teardown, was skipped, or was an expected failure (xfail, xpass)."""
        report = yield
        session = HarnessSession.from_config(item.config)
        if report.when == "call":
            checks = session.pending.pop(item.nodeid, [])
            if report.passed and not hasattr(report, "wasxfail"):
                session.updates += checks
        elif report.when == "teardown" and report.failed:
            session.updates = [u for u in session.updates if (u.path, u.case_id) not in _keys(session, item)]
        return report

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Writes the passed checks, unless the session was interrupted (then nothing is written
        and the summary says so). A file that cannot be written fails the session, in one line."""
        state = HarnessSession.from_config(session.config)
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            return
        state.write_updates()
        if state.interrupted:
            session.exitstatus = pytest.ExitCode.INTERRUPTED
        elif state.not_written and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        state = HarnessSession.from_config(config)
        if state.options.update_baselines:
            _baselines_summary(terminalreporter, state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
        if not state.metrics:
            return
        columns = sorted({k for values in state.metrics.values() for k in values})
        rows = [[case, *(values.get(c, "") for c in columns)] for case, values in sorted(state.metrics.items())]
        terminalreporter.write_sep("=", "harness metrics")
        terminalreporter.write_line(tabulate(rows, headers=["case", *columns], floatfmt=".4g"))


def _keys(session: HarnessSession, item: pytest.Item) -> set[tuple[Path, str]]:
    return {key for key, nodeid in session.checked.items() if nodeid == item.nodeid}


def _baselines_summary(terminalreporter, state: HarnessSession, interrupted: bool) -> None:
    """What ``--harness-update-baselines`` wrote, did not write, and why, file by file."""
    if interrupted:
        pending = sorted({str(u.path) for u in state.updates})
        terminalreporter.write_sep("=", "baselines NOT updated")
        terminalreporter.write_line(
            f"interrupted: no baseline was written ({len(state.updates)} passed checks of {len(pending)} files "
            "discarded); rerun with --harness-update-baselines"
        )
        return
    if state.written:
        terminalreporter.write_sep("=", "baselines updated (review the diff before committing)")
    for path in state.written:
        for update in (u for u in state.updates if u.path == path):
            terminalreporter.write_line(f"{path} :: {update.case_id}")
            terminalreporter.write_line(comparison_table(update.old or {}, update.metrics)[1])
    for line in state.not_written:
        terminalreporter.write_line(f"baseline not updated: {line}", red=True)


def format_markers() -> dict[str, str]:
    """``{marker: description}`` for every format family of the registry (``mxfp6``: cases of
    mxfp6_e2m3 and mxfp6_e3m2), so a new format's marker is registered with no list to edit."""
    families: dict[str, list[str]] = {}
    for name in list_formats():
        families.setdefault(format_marker(name), []).append(name)
    return {marker: f"cases of {' and '.join(names)}" for marker, names in families.items()}
