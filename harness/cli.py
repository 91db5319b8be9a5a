"""Command line: ``python -m harness <command>`` (the suites and the CLI call the same functions)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from harness.baselines import BaselineError
from harness.eval.gsm8k import TASKS as GSM8K_TASKS
from harness.formats import FORMATS, SCALE_MODES, list_formats
from harness.inject import POINTS
from harness.models import DEFAULT_MODEL, DTYPES
from harness.testing import format_marker
from harness.validate import (
    check_compare_to,
    check_scan_options,
    count_arg,
    device_arg,
    output_dir_arg,
    output_file_arg,
)


def _formats(args: argparse.Namespace) -> int:
    rows = [
        [
            f.name,
            f.element.name,
            "x".join(map(str, f.block_shape)),
            f.scale.name,
            f.bits_per_element,
            format_marker(f.name),
            f.description,
        ]
        for f in FORMATS.values()
    ]
    print(tabulate(rows, headers=["format", "element", "block", "scale", "bits/elem", "marker", "description"]))
    return 0


def _eval_loss(args: argparse.Namespace) -> int:
    from harness.data import load_gsm8k
    from harness.eval.loss import evaluate_loss
    from harness.inject import QuantInjector
    from harness.models import load_model

    items = load_gsm8k("test", args.items, args.gsm8k_dir)
    model, tok = load_model(
        args.model, dtype=DTYPES[args.dtype], device=args.device, trust_remote_code=args.trust_remote_code
    )
    with QuantInjector(model, args.format, args.point, seed=args.seed, scale_mode=args.scale_mode) as inj:
        result = evaluate_loss(model, tok, items, inj, batch_size=args.batch_size, progress=not args.json)
    summary = result.summary()
    cmp = result.comparison()
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "format": args.format,
                    "scale_mode": args.scale_mode,
                    "point": args.point,
                    "dtype": args.dtype,
                    "modules": len(inj.modules),
                    **summary,
                    "comparison": cmp.as_dict(),
                    "per_item": result.per_item(),
                },
                indent=2,
            )
        )
        return 0
    print(
        f"model {args.model}, {args.format} on {args.point} of {len(inj.modules)} Linear modules, "
        f"{summary['n']} GSM8K test items, {summary['tokens']} answer tokens, {args.dtype}"
    )
    for note in inj.notes:
        print(f"note: {note}")
    rows = [
        ["reference", summary["reference_loss"], 0.0, 1.0],
        [args.format, summary["loss"], summary["kl"], summary["top1_agree"]],
    ]
    print(tabulate(rows, headers=["model", "loss", "kl", "top1_agree"], floatfmt=".4f"))
    print(
        f"paired difference (quantized - reference, per-item loss): {cmp.mean_diff:+.4f} "
        f"[95% CI {cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}], t-test p={cmp.p_value:.3g}, "
        f"Wilcoxon p={cmp.p_wilcoxon:.3g}, Cohen's d={cmp.cohens_d:.2f}, n={cmp.n}: {cmp.verdict}"
    )
    return 0


def _eval_gsm8k(args: argparse.Namespace) -> int:
    from harness.data import load_gsm8k
    from harness.eval.gsm8k import compare_results, evaluate_gsm8k, lm_eval_table
    from harness.inject import QuantInjector
    from harness.models import load_model

    compare_to = check_compare_to(args.compare_to, args.task, args.limit) if args.compare_to else None
    load_gsm8k("test", args.limit, args.gsm8k_dir)  # a bad file is named before the model loads
    model, tok = load_model(
        args.model, dtype=DTYPES[args.dtype], device=args.device, trust_remote_code=args.trust_remote_code
    )
    options = dict(
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data_dir=args.gsm8k_dir,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        seed=args.seed,
        tasks_dir=args.tasks_dir,
    )
    runs = {}
    if args.format == "none" or not args.no_reference:
        print("reference model (no quantization)", flush=True)
        runs["reference"] = evaluate_gsm8k(model, tok, args.task, **options)
    if args.format != "none":
        print(f"{args.format} on {args.point}", flush=True)
        with QuantInjector(model, args.format, args.point, seed=args.seed, scale_mode=args.scale_mode):
            runs[args.format] = evaluate_gsm8k(model, tok, args.task, **options)
    for name, result in runs.items():
        print(f"\n{name}: {args.model}, {result.n} items, {result.settings['n_shot']}-shot\n{lm_eval_table(result)}")
    under_test = runs[args.format if args.format != "none" else "reference"]
    pairs = []
    if args.format != "none" and "reference" in runs:
        pairs.append(("reference", runs["reference"].per_item))
    if compare_to is not None:
        pairs.append((args.compare_to, compare_to))
    comparisons = {}
    for label, items in pairs:
        cmps = compare_results(items, under_test.per_item)
        comparisons[label] = {m: c.as_dict() for m, c in cmps.items()}
        rows = [
            [m, c.mean_a, c.mean_b, c.mean_diff, f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]", c.p_value, c.verdict]
            for m, c in cmps.items()
        ]
        subject = args.format if args.format != "none" else args.model
        print(f"\n{subject} against {label} (paired, same items; means of per-item values):")
        print(tabulate(rows, headers=["metric", label, "now", "diff", "95% CI", "p", ""], floatfmt=".4f"))
    if args.output:
        doc = {
            "model": args.model,
            "format": args.format,
            "point": args.point,
            "dtype": args.dtype,
            "task": args.task,
            "settings": under_test.settings,
            "result": {"metrics": under_test.metrics, "per_item": under_test.per_item},
            "runs": {name: {"metrics": r.metrics, "per_item": r.per_item} for name, r in runs.items()},
            "comparisons": comparisons,
            "samples": under_test.samples,
        }
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {out}")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from harness.data import load_gsm8k
    from harness.formats import get_format
    from harness.models import load_model, model_key
    from harness.srdd.criteria import Thresholds
    from harness.srdd.report import markdown_summary, write_report
    from harness.srdd.run import scan_model
    from harness.srdd.sensitivity import DEFAULT_MODE

    check_scan_options(args.attribution, args.eval_items, args.instability_runs)
    thresholds = Thresholds(
        args.sqnr_threshold,
        args.deadzone_threshold,
        args.saturation_threshold,
        args.relative_error_threshold,
        args.kurtosis_ratio_threshold,
        args.gain_ratio_threshold,
    )
    calibration = load_gsm8k("train", args.prompts, args.gsm8k_dir)
    evaluation = load_gsm8k("test", args.eval_items, args.gsm8k_dir) if args.eval_items else []
    model, tok = load_model(
        args.model, dtype=DTYPES[args.dtype], device=args.device, trust_remote_code=args.trust_remote_code
    )
    runs = (
        args.instability_runs if args.instability_runs is not None else (5 if get_format(args.format).stochastic else 2)
    )
    doc = scan_model(
        model,
        tok,
        calibration,
        args.format,
        args.point,
        model_name=model_key(args.model),
        thresholds=thresholds,
        evaluation=evaluation,
        attribution=bool(args.attribution),
        attribution_mode=args.attribution or DEFAULT_MODE,
        gain=not args.no_gain,
        instability_runs=runs,
        batch_size=args.batch_size,
        do_verify=bool(evaluation),
        progress=True,
    )
    if args.output:
        doc.write(args.output)
    if args.report_dir:
        print(f"report: {write_report(doc, args.report_dir)}")
    print(markdown_summary(doc))
    if doc.has_nonfinite:
        print("error: NaN/Inf found (see the non-finite findings above)", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from harness.srdd.document import ScanDocument
    from harness.srdd.report import compare_scans

    print(compare_scans(ScanDocument.read(args.a), ScanDocument.read(args.b)))
    return 0


def _aqn_config(args: argparse.Namespace):
    from harness.aqn.configs import AQNConfig, get_config

    if args.config.endswith(".json"):
        try:
            raw = json.loads(Path(args.config).read_text())
            return AQNConfig(
                name=raw.get("name", Path(args.config).stem),
                sigma_start=float(raw["sigma_start"]),
                sigma_end=float(raw["sigma_end"]),
                num_stages=int(raw["num_stages"]),
                layer_types=tuple(raw.get("layer_types", ["rmsnorm"])),
                source=args.config,
                scale=raw.get("scale", "absolute"),
            )
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{args.config}: not a valid AQN config JSON ({err!r}); needs sigma_start, "
                "sigma_end, num_stages and optionally layer_types, scale"
            ) from err
    return get_config(args.config)


def _aqn_preflight(args: argparse.Namespace) -> int:
    from harness.aqn.preflight import Thresholds, preflight
    from harness.data import load_gsm8k
    from harness.models import load_model

    config = _aqn_config(args)
    config.schedule(total_steps=config.num_stages)  # fail before loading anything
    thresholds = Thresholds(args.risky_loss, args.risky_top1, args.collapse_loss, args.collapse_top1)
    items = load_gsm8k("test", args.items, args.gsm8k_dir)
    model, tok = load_model(args.model, device=args.device)
    result = preflight(
        model,
        tok,
        items,
        config,
        fmt=args.format,
        point=args.point,
        draws=args.draws,
        seed=args.seed,
        answer_lines=args.answer_lines,
        thresholds=thresholds,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(tabulate([[k, v] for k, v in result.as_dict().items() if not isinstance(v, (dict, list))], floatfmt=".4f"))
    print(tabulate(result.draws, headers="keys", floatfmt=".4f"))
    li, t1 = result.loss_increase, result.top1_agree
    print(
        f"{config.name}: {result.verdict.upper()}: loss {li.mean:+.1%} [95% CI {li.low:+.1%}, {li.high:+.1%}], "
        f"top-1 agreement {t1.mean:.3f} [{t1.low:.3f}, {t1.high:.3f}] over {len(result.draws)} draws x "
        f"{result.items} items (risky: > {thresholds.risky_loss_increase:.0%} or < {thresholds.risky_top1:.2f}; "
        f"collapse: > {thresholds.collapse_loss_increase:.0%} or < {thresholds.collapse_top1:.2f})"
    )
    return 0


def _aqn_compare(args: argparse.Namespace) -> int:
    from harness.aqn.train import compare_strategies, harmful_layers
    from harness.data import load_gsm8k
    from harness.models import load_model, model_key
    from harness.report import aqn_markdown
    from harness.srdd import scan

    config = _aqn_config(args)
    config.schedule(args.steps)
    strategies = args.strategies.split(",")
    if args.output and Path(args.output).suffix == ".json":
        raise ValueError(
            f"--output {args.output}: the markdown goes there and the JSON beside it, as .json; use a .md name"
        )
    problematic, how = [], "no attribution given"
    if args.attribution:
        try:
            attribution = json.loads(Path(args.attribution).read_text())["attribution"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{args.attribution}: not a scan JSON with an 'attribution' list ({err!r})") from err
        problematic = harmful_layers(attribution)
        how = f"layers whose attribution CI of Δloss excludes 0 ({args.attribution})"
    elif {"targeted", "healthy"} & set(strategies):
        raise ValueError(
            "strategies targeted/healthy need --attribution SCAN.json with per-layer CIs "
            f"(python -m harness scan --model {args.model} --format {args.format} --attribution --output SCAN.json)"
        )
    train = load_gsm8k("train", args.train_items, args.gsm8k_dir)
    evaluation = load_gsm8k("test", args.eval_items, args.gsm8k_dir)
    model, tok = load_model(args.model, device=args.device)
    comparison = compare_strategies(
        model,
        tok,
        train,
        evaluation,
        fmt=args.format,
        config=config,
        strategies=strategies,
        seeds=list(range(args.seeds)),
        steps=args.steps,
        layers=[name for name, _ in scan.decoder_layers(model)],
        problematic=problematic,
        batch_size=args.batch_size,
        progress=True,
    )
    text = aqn_markdown(comparison, model_key(args.model), problematic, how)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"rows": comparison.rows(), **comparison.__dict__}, indent=2))
    print(text)
    return 0


def _gate(args: argparse.Namespace) -> int:
    from harness.gate import GateError, choose_metric, paired_gate, read_per_item

    try:
        (baseline, ids_a), (candidate, ids_b) = read_per_item(args.baseline), read_per_item(args.candidate)
        if ids_a is not None and ids_b is not None and ids_a != ids_b:
            raise GateError(f"the documents hold different items ({len(ids_a)} vs {len(ids_b)} ids, not the same)")
        metric = choose_metric(baseline, candidate, args.metric)
        result = paired_gate(metric, baseline[metric], candidate[metric], alpha=args.alpha, margin=args.margin)
    except GateError as err:
        print(f"not comparable: {err}")
        return 2
    print(result.line())
    return result.exit_code


def _model_options(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or local HF directory")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--batch-size", type=count_arg(1), default=8)
    p.add_argument(
        "--gsm8k-dir", default=None, help="GSM8K folder (default: $HARNESS_GSM8K_DIR, else the copy in the package)"
    )
    p.add_argument("--trust-remote-code", action="store_true")


def _scale_mode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale-mode", default="floor", choices=SCALE_MODES, help="E8M0 shared-exponent rule (default: floor, OCP)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("formats", help="list the registered quantization formats").set_defaults(run=_formats)

    evaluate = commands.add_parser("eval", help="evaluate a quantized model").add_subparsers(dest="what", required=True)
    loss = evaluate.add_parser("loss", help="answer-token loss, KL and top-1 agreement vs the reference model")
    _model_options(loss)
    loss.add_argument("--format", required=True, choices=list_formats())
    loss.add_argument("--point", default="weight", choices=POINTS)
    loss.add_argument("--items", type=count_arg(1), default=32, help="first N GSM8K test items (default 32)")
    loss.add_argument("--seed", type=int, default=0, help="seed of stochastic formats")
    _scale_mode_option(loss)
    loss.add_argument("--json", action="store_true", help="print JSON instead of tables")
    loss.set_defaults(run=_eval_loss)

    gs = evaluate.add_parser("gsm8k", help="GSM8K through lm-eval on the quantized model, vs the reference")
    _model_options(gs)
    gs.add_argument("--format", default="none", choices=["none", *list_formats()], help="none: the model as it is")
    gs.add_argument("--point", default="weight", choices=POINTS)
    gs.add_argument("--task", default="gsm8k", choices=list(GSM8K_TASKS), help="gsm8k (exact match) or gsm8k_bpb")
    gs.add_argument("--limit", type=count_arg(1), default=None, help="first N test items (default: all 1319)")
    gs.add_argument(
        "--num-fewshot", type=count_arg(0), default=None, help="default: the task's (5 for gsm8k, 0 for bpb)"
    )
    gs.add_argument("--max-gen-toks", type=count_arg(1), default=None, help="generation cap (default: the task's, 256)")
    gs.add_argument("--no-reference", action="store_true", help="skip the unquantized run and its comparison")
    gs.add_argument("--compare-to", help="a previous --output JSON: paired comparison on the same items")
    gs.add_argument("--seed", type=int, default=0, help="few-shot sampling and stochastic formats")
    _scale_mode_option(gs)
    gs.add_argument("--tasks-dir", help="keep the task YAMLs here (for lm_eval --include_path)")
    gs.add_argument("--output", type=output_file_arg, help="write metrics, per-item results and samples as JSON")
    gs.set_defaults(run=_eval_gsm8k)

    sc = commands.add_parser("scan", help="SRDD scan: per-layer detectors, findings, recommendation, report")
    _model_options(sc)
    sc.add_argument("--format", required=True, choices=list_formats())
    sc.add_argument("--point", default="weight", choices=POINTS)
    sc.add_argument("--prompts", type=count_arg(1), default=32, help="calibration texts from GSM8K train (default 32)")
    sc.add_argument("--sqnr-threshold", type=float, default=None)
    sc.add_argument("--deadzone-threshold", type=float, default=None)
    sc.add_argument("--saturation-threshold", type=float, default=None)
    sc.add_argument("--relative-error-threshold", type=float, default=None)
    sc.add_argument("--kurtosis-ratio-threshold", type=float, default=None)
    sc.add_argument("--gain-ratio-threshold", type=float, default=None)
    sc.add_argument(
        "--eval-items",
        type=count_arg(0),
        default=32,
        help="GSM8K test items for attribution and verification (0: skip both; default 32)",
    )
    sc.add_argument(
        "--attribution",
        nargs="?",
        const="exact",
        choices=["exact", "screen"],
        help="per-layer loss attribution with 95%% CIs: 'exact' (default) = every layer exactly; 'screen' = "
        "Fisher screen of every layer (estimates) + exact attribution of its top 5 and the flagged layers",
    )
    sc.add_argument("--no-gain", action="store_true", help="skip the gain scan")
    sc.add_argument(
        "--instability-runs",
        type=count_arg(0),
        default=None,
        help="runs of the instability scan (default: 5 for stochastic formats, else 2)",
    )
    sc.add_argument("--output", type=output_file_arg, help="write the scan JSON here")
    sc.add_argument("--report-dir", type=output_dir_arg, help="write summary.md, results.json and PNG plots here")
    sc.set_defaults(run=_scan)

    aqn = commands.add_parser("aqn", help="AQN noise: pre-flight collapse check, strategy comparison")
    aqn_cmds = aqn.add_subparsers(dest="what", required=True)
    for name, helptext, run in (
        ("preflight", "ok / risky / collapse before any training", _aqn_preflight),
        ("compare", "train each strategy for the same steps and seeds, compare", _aqn_compare),
    ):
        p = aqn_cmds.add_parser(name, help=helptext)
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--format", default="mxfp4", choices=list_formats())
        p.add_argument("--config", default="qerl-default", help="a named configuration or a JSON file")
        p.add_argument("--device", default="cpu", type=device_arg)
        p.add_argument("--gsm8k-dir", default=None)
        p.set_defaults(run=run)
        if name == "preflight":
            p.add_argument("--point", default="weight", choices=POINTS)
            p.add_argument("--items", type=count_arg(1), default=32, help="GSM8K test items (default 32)")
            p.add_argument("--draws", type=count_arg(2), default=8, help="seeded noise draws (default 8)")
            p.add_argument("--answer-lines", type=count_arg(0), default=1, help="answer lines scored per item (0: all)")
            p.add_argument("--seed", type=int, default=0, help="first noise seed (draw d uses seed + d)")
            for flag, value in (
                ("risky-loss", 0.10),
                ("risky-top1", 0.80),
                ("collapse-loss", 0.50),
                ("collapse-top1", 0.50),
            ):
                p.add_argument(f"--{flag}", type=float, default=value, help=f"verdict line (default {value})")
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--strategies", default="none,global,targeted,healthy")
            p.add_argument(
                "--seeds", type=count_arg(2), default=5, help="training runs per strategy, the unit (default 5)"
            )
            p.add_argument("--steps", type=count_arg(1), default=20)
            p.add_argument("--batch-size", type=count_arg(1), default=4, help="training sequences per step (default 4)")
            p.add_argument("--train-items", type=count_arg(1), default=256)
            p.add_argument("--eval-items", type=count_arg(1), default=32)
            p.add_argument(
                "--attribution", help="a scan JSON with per-layer attribution CIs: picks the targeted layers"
            )
            p.add_argument(
                "--output", type=output_file_arg, help="write the markdown table here (and the JSON beside it)"
            )

    gate = commands.add_parser(
        "gate",
        help="paired gate of CANDIDATE against BASELINE: exit 0 pass, 1 regression, 2 inconclusive / not comparable",
    )
    gate.add_argument("baseline", help='`eval gsm8k --output`, `eval loss --json` or {"per_item": {metric: [...]}}')
    gate.add_argument("candidate", help="the same kind of document, on the same items")
    gate.add_argument("--metric", help="default: exact match (strict), bits per byte or loss, or the only shared one")
    gate.add_argument("--alpha", type=float, default=0.05, help="one-sided significance level (default 0.05)")
    gate.add_argument("--margin", type=float, help="largest drop that passes, metric's unit (default: per metric)")
    gate.set_defaults(run=_gate)

    cmp = commands.add_parser("compare", help="compare two scan JSONs layer by layer (A vs B)")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, BaselineError) as err:  # bad input: a clear message, no traceback
        parser.exit(2, f"error: {err}\n")
    except OSError as err:  # a file the run could not read or write: named, no traceback
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
