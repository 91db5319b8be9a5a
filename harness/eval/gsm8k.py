"""GSM8K through lm-eval (EleutherAI's lm-evaluation-harness): the package's task YAMLs, built on
lm-eval's stock ``lm_eval/tasks/gsm8k/gsm8k.yaml`` by ``include`` and reading the packaged (or a
local) GSM8K JSONL, evaluated on the in-memory model (with whatever injector is active) as
``HFLM(pretrained=model, tokenizer=tok)``, per-item results kept for paired comparisons.

- ``gsm8k``: 5-shot generation, ``exact_match`` under lm-eval's ``strict-match`` and
  ``flexible-extract`` filters, stop list extended with a blank line, ``max_gen_toks`` capped;
- ``gsm8k_bpb``: ``loglikelihood_rolling`` of ``Question: …\\nAnswer: …``; ``bits_per_byte``
  (−Σ log p / Σ bytes / ln 2 over the items) and ``word_perplexity``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn

from harness.batching import prefix_token_id
from harness.eval import REFERENCE
from harness.eval.loss import EVAL_BATCH_SIZE
from harness.eval.stats import PairedComparison, compare_paired
from harness.gsm8k import SPLITS, gsm8k_dir, gsm8k_file
from harness.inject import QuantInjector
from harness.peritem import Dataset, PerItemDocument, provenance
from harness.vocab import Vocab

TASK_TEMPLATES = Path(__file__).parent / "tasks"


class Task(Vocab, kind="GSM8K task"):
    """The GSM8K evaluations ``harness eval gsm8k --task`` runs (lm-eval tasks of the package's YAML)."""

    GSM8K = "gsm8k"  # generation, exact match of the final answer (lm-eval's strict and flexible extraction)
    GSM8K_BPB = "gsm8k_bpb"  # bits per byte of "Question: ...\nAnswer: ..." (loglikelihood_rolling, zero-shot)


# What users ask for -> the task name of the package's YAML.
TASKS = {Task.GSM8K.value: "harness_gsm8k", Task.GSM8K_BPB.value: "harness_gsm8k_bpb"}
NO_FORMAT = "none"  # the ``fmt`` of a run of the model as it is
# The per-item metrics each task keeps (lm-eval's "metric,filter" keys).
ITEM_METRICS = {
    "gsm8k": ("exact_match,flexible-extract", "exact_match,strict-match"),
    "gsm8k_bpb": ("bits_per_byte,none",),
}
STOCK_PREFIX = "lm_eval:"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def check_task(task: str) -> Task:
    """The :class:`Task` ``task``; :class:`harness.vocab.UnknownName` naming the valid tasks otherwise."""
    return Task.parse(task)


def stock_task_file(relative: str) -> Path:
    """A file of the installed lm-eval's task tree, e.g. ``tasks/gsm8k/gsm8k.yaml``."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval {lm_eval.__version__} has no {relative} (looked at {path})")
    return path


def write_tasks(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Write the package's task YAMLs into ``out_dir``, ready for ``lm_eval --include_path``:
    ``include: lm_eval:…`` becomes the installed stock file's absolute path, and the dataset
    becomes ``json`` over the GSM8K test and train files of :func:`harness.gsm8k.gsm8k_dir` (the
    packaged ``.jsonl.gz`` by default; the json loader decompresses them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {s: str(gsm8k_file(s, data_dir).resolve()) for s in SPLITS}
    for template in sorted(TASK_TEMPLATES.glob("*.yaml")):
        config = yaml.safe_load(template.read_text())
        include = config["include"]
        if include.startswith(STOCK_PREFIX):
            config["include"] = str(stock_task_file(include[len(STOCK_PREFIX) :]))
        config |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        (out / template.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@dataclass
class Gsm8kResult:
    """One lm-eval run of a GSM8K task: aggregate metrics, per-item values (doc order) and the
    logged samples (``doc_id``, prompt, response, extracted answer, target)."""

    task: str
    n: int
    metrics: dict[str, float]
    per_item: dict[str, list[float]]
    samples: list[dict] = field(repr=False)
    lm_eval_results: dict = field(repr=False)
    settings: dict = field(default_factory=dict)
    item_ids: list[int] = field(default_factory=list)  # lm-eval's doc_id of each item, in per_item's order


def _item_value(task: str, sample: dict, key: str) -> float:
    metric = key.split(",")[0]
    value = sample[metric]
    if task == "gsm8k_bpb":  # (loglikelihood, bytes) per document
        loglikelihood, n_bytes = value
        return -loglikelihood / n_bytes / math.log(2)
    return float(value)


def _collect(task: str, raw: dict, settings: dict) -> Gsm8kResult:
    name = TASKS[task]
    metrics = {k: float(v) for k, v in raw["results"][name].items() if isinstance(v, (int, float)) and k != "alias"}
    per_item: dict[str, list[float]] = {}
    samples, ids = [], []
    for key in ITEM_METRICS[task]:
        filt = key.split(",")[1]
        rows = sorted((s for s in raw["samples"][name] if s["filter"] == filt), key=lambda s: s["doc_id"])
        per_item[key] = [_item_value(task, s, key) for s in rows]
        ids = ids or [s["doc_id"] for s in rows]
        samples += [
            {
                "doc_id": s["doc_id"],
                "filter": filt,
                "target": s["target"],
                "response": s["resps"][0][0] if task == "gsm8k" else None,
                "extracted": s["filtered_resps"][0] if task == "gsm8k" else None,
                key: per_item[key][i],
            }
            for i, s in enumerate(rows)
        ]
    n = len(per_item[ITEM_METRICS[task][0]])  # every kept metric has one value per item
    return Gsm8kResult(task, n, metrics, per_item, samples, raw, settings, ids)


def run_task(
    lm,
    task: str = "gsm8k_bpb",
    *,
    limit: int | None = 32,
    num_fewshot: int | None = None,
    data_dir: str | os.PathLike | None = None,
    max_gen_toks: int | None = None,
    seed: int = 0,
    tasks_dir: str | os.PathLike | None = None,
) -> Gsm8kResult:
    """Run one GSM8K task on an lm-eval ``LM`` through ``lm_eval.simple_evaluate``.

    ``limit`` takes the first n test items; ``num_fewshot`` defaults to the task's (5 for
    ``gsm8k``, 0 for ``gsm8k_bpb``); few-shot examples come from train with a fixed seed. The
    data is local (:func:`harness.gsm8k.gsm8k_dir`), so the run is offline (the ``HF_*_OFFLINE``
    variables are set)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    check_task(task)
    local = gsm8k_dir(data_dir)
    os.environ.update(OFFLINE_ENV)
    with tempfile.TemporaryDirectory(prefix="harness-tasks-") as tmp:
        include = write_tasks(tasks_dir or tmp, local)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=[TASKS[task]],
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=True,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks and task == "gsm8k" else None,
            task_manager=TaskManager(include_path=str(include), include_defaults=False),
            random_seed=seed,  # simple_evaluate seeds random, numpy, torch and the few-shot sampler
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,
        )
    settings = {
        "task": TASKS[task],
        "limit": limit,
        "n_shot": raw.get("n-shot", {}).get(TASKS[task]),
        "max_gen_toks": max_gen_toks,
        "data": str(local),
        "seed": seed,
        "lm_eval": lm_eval.__version__,
    }
    return _collect(task, raw, settings)


def evaluate_gsm8k(
    model: nn.Module, tokenizer, task: str = "gsm8k_bpb", *, batch_size: int = EVAL_BATCH_SIZE, **options
) -> Gsm8kResult:
    """:func:`run_task` on the in-memory model as it is now (quantized while an injector is
    active), wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` with the harness's BOS
    policy as its loglikelihood prefix (``harness.batching.prefix_token_id``, lm-eval's own rule)."""
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        prefix_token_id=prefix_token_id(tokenizer),
    )
    return run_task(lm, task, **options)


def compare_results(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, PairedComparison]:
    """Per metric, ``b`` against ``a`` on the same items: McNemar for exact match, a paired
    t-test for bits per byte (both with a bootstrap CI of the difference)."""
    out = {}
    for metric in b:
        if metric in a:
            if len(a[metric]) != len(b[metric]):
                raise ValueError(f"{metric}: runs on different items ({len(a[metric])} vs {len(b[metric])})")
            out[metric] = compare_paired(a[metric], b[metric], binary=metric.startswith("exact_match"))
    return out


def lm_eval_table(result: Gsm8kResult) -> str:
    """lm-eval's own results table (``lm_eval.utils.make_table``)."""
    from lm_eval.utils import make_table

    return make_table(result.lm_eval_results)


@dataclass
class Gsm8kRuns:
    """The runs of one ``eval gsm8k`` (:data:`REFERENCE` and/or ``fmt``) and the paired comparisons
    of the run under test against each earlier run, ``{label: {metric: comparison}}``."""

    model: str
    fmt: str  # NO_FORMAT: the model as it is
    point: str
    dtype: str
    task: str
    runs: dict[str, Gsm8kResult]
    comparisons: dict[str, dict[str, PairedComparison]] = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # harness.inject.Coverage.to_json() when fmt quantized

    @property
    def under_test(self) -> Gsm8kResult:
        return self.runs[REFERENCE if self.fmt == NO_FORMAT else self.fmt]

    def document(self, *, model: dict, dataset: Dataset) -> PerItemDocument:
        """The ``--output`` document (:class:`harness.peritem.PerItemDocument`, what
        ``--compare-to`` and ``python -m harness gate`` read): the run under test's per-item
        values and metrics; every run, the comparisons and lm-eval's samples in ``details``."""
        under_test = self.under_test
        return PerItemDocument(
            kind="eval gsm8k",
            model=model,
            recipe={
                "format": self.fmt,
                "point": self.point,
                "dtype": self.dtype,
                "coverage": self.coverage,
                **under_test.settings,
            },
            dataset=dataset,
            item_ids=tuple(under_test.item_ids or range(under_test.n)),
            per_item={k: tuple(v) for k, v in under_test.per_item.items()},
            aggregate=under_test.metrics,
            provenance=provenance("eval gsm8k"),
            details={
                "runs": {name: {"metrics": r.metrics, "per_item": r.per_item} for name, r in self.runs.items()},
                "comparisons": {
                    label: {m: c.as_dict() for m, c in cmps.items()} for label, cmps in self.comparisons.items()
                },
                "samples": under_test.samples,
            },
        )


def run_gsm8k(
    model: nn.Module,
    tokenizer,
    task: str,
    *,
    model_name: str,
    dtype: str,
    fmt: str = NO_FORMAT,
    point: str = "weight",
    with_reference: bool = True,
    compare_to: dict[str, dict[str, list[float]]] | None = None,
    scale_mode: str | None = None,
    seed: int = 0,
    progress: bool = False,
    allow_partial: bool = False,
    **options,
) -> Gsm8kRuns:
    """:func:`evaluate_gsm8k` of the unquantized model (unless ``fmt`` is given and not
    ``with_reference``) and of the model under ``fmt`` at ``point`` (``scale_mode``, ``seed``:
    the injector's; ``seed`` also lm-eval's few-shot sampling), then the run under test compared
    item by item with the reference run and with each ``compare_to`` run (``{label: per_item}``,
    e.g. :func:`harness.validate.check_compare_to` of an earlier ``--output``).  ``allow_partial``:
    the injector's (its coverage is in ``coverage``)."""
    options["seed"] = seed
    runs = Gsm8kRuns(model_name, fmt, point, dtype, task, {})
    if fmt == NO_FORMAT or with_reference:
        if progress:
            print("reference model (no quantization)", flush=True)
        runs.runs[REFERENCE] = evaluate_gsm8k(model, tokenizer, task, **options)
    if fmt != NO_FORMAT:
        injector_options = {} if scale_mode is None else {"scale_mode": scale_mode}
        with QuantInjector(model, fmt, point, seed=seed, allow_partial=allow_partial, **injector_options) as injector:
            runs.coverage = injector.coverage.to_json()
            if progress:
                print(f"{fmt} on {point}: {injector.coverage.line()}", flush=True)
            runs.runs[fmt] = evaluate_gsm8k(model, tokenizer, task, **options)
    earlier = {REFERENCE: runs.runs[REFERENCE].per_item} if fmt != NO_FORMAT and REFERENCE in runs.runs else {}
    for label, per_item in {**earlier, **(compare_to or {})}.items():
        runs.comparisons[label] = compare_results(per_item, runs.under_test.per_item)
    return runs
