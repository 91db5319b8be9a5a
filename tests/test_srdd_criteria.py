"""SRDD verdicts relative to the format and the model, on small random models:
Gaussian weights are never flagged whatever the format, a planted damaged layer is, attribution
ranks it first, NaN is a finding."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from srdd_models import ITEMS, LAYERS, PLANTED, gaussian_model, planted_model, scan

from harness.cli import main
from harness.formats import fake_quantize
from harness.inject import QuantInjector
from harness.srdd.attribution import loss_attribution, ranked
from harness.srdd.criteria import Rules, Thresholds, floor_failure, outliers, robust_z
from harness.srdd.floors import FLOOR_METRICS, excess, gaussian_floor
from harness.srdd.metrics import QuantErrorStats, clip_threshold
from harness.srdd.scan import ScanResult


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8_e4m3"])
def test_gaussian_weights_are_never_problematic(fmt: str) -> None:
    """The old fixed thresholds flagged every layer under MXFP4 and NVFP4 (SQNR 18.8 dB < 20 dB on
    any Gaussian data); judged against the format's own floor and the other layers, none is."""
    model, tok = gaussian_model()
    doc = scan(model, tok, fmt, do_verify=False)
    assert [layer.reasons for layer in doc.layers] == [[]] * LAYERS
    # nothing stands out; any cost the format has is spread over the layers, never targeted
    spread = any(a.harmful for a in doc.attribution if a.layer != "all")
    assert doc.recommendation.action == ("spread_harm" if spread else "no_action")
    assert doc.recommendation.aqn_layers == []
    if fmt != "mxfp8_e4m3":  # the old absolute thresholds: the format, not the model, fails them
        old = scan(model, tok, fmt, thresholds=Thresholds(sqnr_db=20.0), attribution="none", do_verify=False)
        assert all(r.rule == "threshold" for layer in old.layers for r in layer.reasons)
        assert len(old.problematic_layers) == LAYERS


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8_e4m3"])
def test_a_heavy_tailed_student_t_weight_is_not_below_its_floor(fmt: str) -> None:
    """Trained weights are heavier-tailed than Gaussian; a Student-t(4) weight loses more values to
    zero than its Gaussian floor (its blocks' maxima sit further out) but is a smooth distribution,
    not a defect, so no floor rule flags it (the specificity side of the planted-outlier curve in
    tests/test_srdd_calibration.py)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        w = torch.distributions.StudentT(4.0).sample((512, 32)) * 0.02
    result = ScanResult()
    result.add("w", "weight", w, fake_quantize(w, fmt), fmt, w.shape)  # as weight_scan records a weight
    stats, floor = result.modules["w"]["weight"], result.floors["w"]["weight"]
    assert [m for m in FLOOR_METRICS if floor_failure(m, stats, floor, Rules())] == []
    if fmt != "mxfp8_e4m3":  # FP8 keeps small values; FP4 loses more of them than on Gaussian data
        assert excess("deadzone_ratio", stats.deadzone_ratio, floor.deadzone_ratio) > 1.2


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_planted_layer_is_flagged_by_its_floor_and_ranked_first_by_attribution(planted) -> None:
    model, tok = planted
    doc = scan(model, tok, "mxfp4", attribution="exact", do_verify=False)
    assert doc.problematic_layers == [PLANTED]
    rules = {r.rule for r in doc.layers[3].reasons}
    assert "floor" in rules
    assert any(r.rule == "floor" and r.metric == "deadzone_ratio" for r in doc.layers[3].reasons)
    per_layer = sorted(doc.attribution[1:], key=lambda a: -a.kl)
    assert per_layer[0].layer == PLANTED and per_layer[0].kl_ci[0] > per_layer[1].kl_ci[1]
    assert all(len(a.ci) == 2 and a.ci[0] <= a.delta_loss <= a.ci[1] for a in doc.attribution)


def test_nan_weight_is_a_finding_and_the_cli_exits_non_zero(monkeypatch, tmp_path, capsys) -> None:
    model, tok = gaussian_model()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[5, 7] = float("nan")
    doc = scan(model, tok, "mxfp4", do_verify=False)
    reasons = [r for r in doc.layers[2].reasons if r.rule == "non-finite"]
    assert reasons and reasons[0].tensor == "model.layers.2.mlp.up_proj.weight"
    assert doc.has_nonfinite

    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: (model, tok))
    argv = ["scan", "--format", "mxfp4", "--prompts", "2", "--eval-items", "0", "--gsm8k-dir", gsm8k_dir(tmp_path)]
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert "non-finite" in captured.out and "NaN/Inf found" in captured.err


def gsm8k_dir(tmp_path) -> str:
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(vars(it)) + "\n" for it in ITEMS[:4]))
    return str(tmp_path)


def test_2d_tiles_are_refused_on_activations(tmp_path, capsys) -> None:
    argv = ["scan", "--model", "tiny-llama", "--format", "mxfp4_2d", "--point", "input", "--gsm8k-dir"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, gsm8k_dir(tmp_path), "--prompts", "4", "--eval-items", "0"])
    assert exit_info.value.code == 2 and "would mix tokens" in capsys.readouterr().err.replace("\n", " ")
    model, _ = gaussian_model()
    for point in ("input", "both"):
        with pytest.raises(ValueError, match=r"mxfp4_2d.*would mix\s+tokens"):
            QuantInjector(model, "mxfp4_2d", point)
        with pytest.raises(ValueError, match="non-causal"):
            QuantInjector(model, "mxfp4", point, overrides={"*.q_proj": "mxfp4_2d"})
    QuantInjector(model, "mxfp4_2d", "weight")  # weights: fine


def test_gaussian_floor_is_the_metrics_of_a_seeded_gaussian_tensor_of_that_shape_and_rms() -> None:
    floor = gaussian_floor("mxfp4", (64, 128), 0.05)
    z = torch.randn((64, 128), generator=torch.Generator().manual_seed(0)) * 0.05
    q = fake_quantize(z, "mxfp4")
    direct = QuantErrorStats().update(z, q, clip_threshold(z, "mxfp4"))
    assert floor.as_dict() == direct.as_dict()
    assert floor.sqnr_db == pytest.approx(18.8, abs=0.2)  # the number for MXFP4 on Gaussian data
    assert excess("sqnr_db", 15.79, 18.8) == pytest.approx(2.0, rel=1e-3)  # 3.01 dB = twice the error
    assert excess("deadzone_ratio", 0.3, 0.1) == pytest.approx(3.0)


def test_robust_z_is_median_and_mad_based() -> None:
    values = {f"l{i}": v for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 5.0])}
    med = statistics.median(values.values())
    mad = statistics.median(abs(v - med) for v in values.values())
    z = robust_z(values)
    assert z["l6"] == pytest.approx(0.6745 * (5.0 - med) / mad)
    assert set(outliers(values, Rules(), lambda v, m: v > 1.25 * m)) == {"l6"}
    assert outliers({k: values[k] for k in list(values)[:4]}, Rules(), lambda v, m: True) == {}  # < 5 layers
    same = {f"l{i}": 1.0 for i in range(6)} | {"l6": 1.0 + 1e-9}  # MAD = 0: effect guard stops it
    assert outliers(same, Rules(), lambda v, m: v > 1.25 * m) == {}


def test_attribution_equals_direct_loss_evaluation_and_honours_exclude() -> None:
    """The prefix-reusing attribution equals evaluate_loss with only that layer quantized, item
    by item; excluded modules are never quantized and a layer with none selected is left out."""
    from harness.eval.loss import evaluate_loss

    model, tok = gaussian_model()
    items = ITEMS[:5]
    rows = loss_attribution(model, tok, items, "mxfp4", "both", batch_size=2, exclude=["model.layers.0.*"])
    assert [r.layer for r in rows] == ["all", *[f"model.layers.{i}" for i in range(1, LAYERS)]]
    for row in rows[:3]:
        prefix = "" if row.layer == "all" else row.layer + "."
        with QuantInjector(model, "mxfp4", "both", exclude=["model.layers.0.*"]) as inj:
            with inj.restricted(lambda n, p=prefix: n.startswith(p)):
                res = evaluate_loss(model, tok, items, inj, batch_size=2)
        direct = [(q - r) / n for q, r, n in zip(res.nll, res.reference_nll, res.n_tokens)]
        assert row.delta_loss_items == pytest.approx(direct, abs=1e-5)
        assert row.kl_items == pytest.approx([k / n for k, n in zip(res.kl, res.n_tokens)], abs=1e-6)
    assert ranked(rows)[0].kl == max(r.kl for r in rows[1:]) and math.isfinite(rows[0].kl)
