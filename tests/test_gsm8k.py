"""The GSM8K tasks through lm-eval without a model: the shipped YAMLs resolve to lm-eval's stock
task and the packaged (or a local) GSM8K JSONL, and scripted lm-eval ``LM``s with known answers get exactly the scores
those answers must get (gold answers: exact match 1; a fixed wrong number: 0; a log-likelihood
of -ln 2 per byte: 1 bit per byte)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.model import LM

from harness.eval import REFERENCE, gsm8k
from harness.eval.gsm8k import (
    ITEM_METRICS,
    Gsm8kResult,
    compare_results,
    run_gsm8k,
    run_task,
    stock_task_file,
    write_tasks,
)
from harness.gsm8k import gsm8k_file, load_gsm8k
from harness.models import load_model
from harness.paths import data_dir
from harness.peritem import dataset_of


class ScriptedLM(LM):
    """Answers every generation request with ``answer(doc)`` and scores every text at -ln 2 per
    UTF-8 byte; remembers the requests it saw."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list = []

    def generate_until(self, requests):
        self.requests += requests
        return [self.answer(r.doc) for r in requests]

    def loglikelihood_rolling(self, requests):
        self.requests += requests
        return [-len(r.args[0].encode("utf-8")) * math.log(2) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError


def test_written_tasks_include_stock_gsm8k_and_read_local_jsonl(tmp_path: Path, gsm8k_dir: Path) -> None:
    out = write_tasks(tmp_path / "tasks", gsm8k_dir)
    gen = yaml.safe_load((out / "harness_gsm8k.yaml").read_text())
    assert gen["include"] == str(stock_task_file("tasks/gsm8k/gsm8k.yaml")) and Path(gen["include"]).is_absolute()
    assert gen["dataset_path"] == "json" and gen["dataset_name"] is None
    files = gen["dataset_kwargs"]["data_files"]
    assert Path(files["test"]) == gsm8k_file("test", gsm8k_dir).resolve() and Path(files["train"]).is_file()
    assert "\n\n" in gen["generation_kwargs"]["until"] and gen["generation_kwargs"]["max_gen_toks"] == 256
    bpb = yaml.safe_load((out / "harness_gsm8k_bpb.yaml").read_text())
    assert bpb["output_type"] == "loglikelihood_rolling" and bpb["dataset_kwargs"] == gen["dataset_kwargs"]


def test_without_a_local_directory_the_packaged_copy_is_read(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HARNESS_GSM8K_DIR", raising=False)
    gen = yaml.safe_load((write_tasks(tmp_path) / "harness_gsm8k.yaml").read_text())
    assert gen["dataset_kwargs"]["data_files"] == {
        s: str((data_dir() / "gsm8k" / f"{s}.jsonl.gz").resolve()) for s in ("test", "train")
    }


def test_gold_answers_score_one_and_a_wrong_number_zero(gsm8k_dir: Path) -> None:
    gold = ScriptedLM(lambda doc: " " + doc["answer"])
    right = run_task(gold, "gsm8k", limit=4, data_dir=gsm8k_dir)
    wrong = run_task(
        ScriptedLM(lambda doc: " The answer is 123456789.\n#### 123456789"), "gsm8k", limit=4, data_dir=gsm8k_dir
    )
    for key in ITEM_METRICS["gsm8k"]:
        assert right.per_item[key] == [1.0] * 4 and right.metrics[key] == 1.0
        assert wrong.per_item[key] == [0.0] * 4
    items = load_gsm8k("test", 4, gsm8k_dir)
    context, gen_kwargs = gold.requests[0].args
    assert context.count("Question:") == 6 and context.endswith(f"Question: {items[0].question}\nAnswer:")  # 5 shots
    assert "\n\n" in gen_kwargs["until"] and gen_kwargs["max_gen_toks"] == 256
    assert right.settings["n_shot"] == 5 and right.n == 4
    assert [s["extracted"] for s in right.samples[:4]] == [i.answer.split("#### ")[-1] for i in items]


def test_bits_per_byte_of_a_known_loglikelihood(gsm8k_dir: Path) -> None:
    lm = ScriptedLM(None)
    result = run_task(lm, "gsm8k_bpb", limit=3, data_dir=gsm8k_dir)
    assert result.metrics["bits_per_byte,none"] == pytest.approx(1.0, rel=1e-12)
    assert result.per_item["bits_per_byte,none"] == pytest.approx([1.0] * 3, rel=1e-12)
    items = load_gsm8k("test", 3, gsm8k_dir)
    assert [r.args[0] for r in lm.requests] == [i.text for i in items]  # the loss's text


def test_max_gen_toks_override_and_unknown_task(gsm8k_dir: Path) -> None:
    lm = ScriptedLM(lambda doc: "#### 1")
    run_task(lm, "gsm8k", limit=1, num_fewshot=0, max_gen_toks=16, data_dir=gsm8k_dir)
    context, gen_kwargs = lm.requests[0].args
    assert gen_kwargs["max_gen_toks"] == 16 and context.count("Question:") == 1
    with pytest.raises(ValueError, match="unknown GSM8K task 'gsm8k_cot'; valid GSM8K tasks: gsm8k, gsm8k_bpb"):
        run_task(lm, "gsm8k_cot", limit=1, data_dir=gsm8k_dir)


def test_compare_results_uses_mcnemar_for_exact_match() -> None:
    a = {"exact_match,flexible-extract": [1.0] * 40, "bits_per_byte,none": [1.0 + 0.01 * i for i in range(40)]}
    b = {
        "exact_match,flexible-extract": [1.0] * 25 + [0.0] * 15,
        "bits_per_byte,none": [1.1 + 0.01 * i for i in range(40)],
    }
    cmp = compare_results(a, b)
    em = cmp["exact_match,flexible-extract"]
    assert em.p_value == pytest.approx(2 * 0.5**15) and em.significant and em.mean_diff == pytest.approx(-15 / 40)
    assert cmp["bits_per_byte,none"].mean_diff == pytest.approx(0.1) and cmp["bits_per_byte,none"].significant
    with pytest.raises(ValueError, match="different items"):
        compare_results(a, {"exact_match,flexible-extract": [1.0] * 39})


def test_run_gsm8k_quantizes_only_the_format_run_and_pairs_it_with_each_earlier_run(monkeypatch) -> None:
    """``eval gsm8k``'s runs and document, with lm-eval replaced by a per-item value read off the
    model itself (|output| of one Linear of a tiny model on 6 fixed inputs): the format's run sees
    the quantized weights, the reference run the original ones, and each comparison pairs the items."""
    torch.manual_seed(0)
    model, x = load_model("tiny-llama")[0], torch.randn(6, 128)
    linear = model.model.layers[0].mlp.down_proj
    metric = "bits_per_byte,none"

    def evaluate(model, tokenizer, task, **options):
        values = linear(x).abs().sum(-1).tolist()
        settings = {"task": gsm8k.TASKS[task], "limit": options["limit"], "seed": options["seed"]}
        return Gsm8kResult(task, len(values), {metric: sum(values) / 6}, {metric: values}, [{}], {}, settings)

    monkeypatch.setattr(gsm8k, "evaluate_gsm8k", evaluate)
    plain = linear(x).abs().sum(-1).tolist()
    runs = run_gsm8k(model, None, "gsm8k_bpb", model_name="m", dtype="float32", limit=6)
    assert list(runs.runs) == [REFERENCE] and runs.comparisons == {} and runs.under_test.per_item[metric] == plain
    runs = run_gsm8k(model, None, "gsm8k_bpb", model_name="m", dtype="float32", fmt="mxfp4", seed=3, limit=6)
    quantized = runs.runs["mxfp4"].per_item[metric]
    assert runs.runs[REFERENCE].per_item[metric] == plain and quantized != plain
    assert linear(x).abs().sum(-1).tolist() == plain  # the weights are back
    cmp = runs.comparisons[REFERENCE][metric]
    assert cmp.n == 6 and cmp.mean_diff == pytest.approx(sum(quantized) / 6 - sum(plain) / 6)
    doc = runs.document(model={"name": "m"}, dataset=dataset_of("gsm8k test", map(str, range(6))))
    assert (doc.kind, doc.model["name"], doc.recipe["format"], doc.recipe["task"], doc.recipe["seed"]) == (
        *("eval gsm8k", "m", "mxfp4"),
        *("harness_gsm8k_bpb", 3),
    )
    assert doc.per_item == {metric: tuple(quantized)} and set(doc.details["runs"]) == {REFERENCE, "mxfp4"}
    assert doc.details["comparisons"][REFERENCE][metric] == cmp.as_dict() and doc.item_ids == tuple(range(6))
    earlier = {metric: [v + 0.5 for v in quantized]}
    runs = run_gsm8k(
        model,
        None,
        "gsm8k_bpb",
        model_name="m",
        dtype="float32",
        fmt="mxfp4",
        with_reference=False,
        compare_to={"old.json": earlier},
        limit=6,
    )
    assert list(runs.runs) == ["mxfp4"] and list(runs.comparisons) == ["old.json"]
    assert runs.comparisons["old.json"][metric].mean_diff == pytest.approx(-0.5)
