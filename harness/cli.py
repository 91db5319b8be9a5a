"""Command line: ``python -m harness <command>`` (the suites and the CLI call the same functions)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from tabulate import tabulate

from harness import atomic, recipes
from harness.aqn import preflight as aqn_preflight
from harness.aqn import train as aqn_train
from harness.baselines import BaselineError
from harness.eval import REFERENCE
from harness.eval.gsm8k import NO_FORMAT
from harness.eval.gsm8k import Task as Gsm8kTask
from harness.eval.loss import EVAL_BATCH_SIZE
from harness.formats import FORMATS, ScaleMode, list_formats
from harness.gate import ALPHA
from harness.gsm8k import CALIBRATION_ITEMS, LOSS_ITEMS
from harness.inject import Coverage, Point, QuantInjector
from harness.models import DEFAULT_MODEL, DTYPES, parse_max_memory
from harness.srdd import criteria as srdd_criteria
from harness.srdd import run as srdd_run
from harness.srdd.sensitivity import ATTRIBUTION_MODES
from harness.srdd.verify import CONTROL_DRAWS
from harness.testing import format_marker
from harness.transforms import Transform
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
            "x".join(map(str, f.block_shape)) or f.grouping,
            f.scale.name,
            f.bits_per_element,
            format_marker(f.name),
            f.description,
        ]
        for f in FORMATS.values()
    ]
    print(tabulate(rows, headers=["format", "element", "block", "scale", "bits/elem", "marker", "description"]))
    print("\nBit-for-bit references (checked in CI) and how the other implementations differ:")
    for f in FORMATS.values():
        print(f"- {f.name}: equals {f.library}")
        if f.differs:
            print(f"  others: {f.differs}")
    return 0


def loss_run(args: argparse.Namespace):
    """The ``eval loss`` computation from its parsed options (``harness sweep`` calls it too):
    ``(LossResult, the document's settings, the injector)``, on the GSM8K test items
    ``first_item … first_item + items - 1``."""
    from harness.eval.loss import evaluate_loss
    from harness.gsm8k import load_gsm8k
    from harness.inject import resolve_sides
    from harness.models import model_identity
    from harness.peritem import item_digests

    items = load_gsm8k("test", args.first_item + args.items, args.gsm8k_dir)[args.first_item :]
    sides = _recipe_options(args)
    model, tok = _load(args)
    calibration = None
    *_, input_format, per_tensor_scale = resolve_sides(**sides)
    if recipes.needs_calibration(input_format, per_tensor_scale == "amax"):
        texts = [item.text for item in load_gsm8k("train", CALIBRATION_ITEMS, args.gsm8k_dir)]
        calibration = recipes.calibration_ids(tok, texts)
    injector = QuantInjector(
        model,
        **sides,
        calibration=calibration,
        transform=args.transform,
        seed=args.seed,
        scale_mode=args.scale_mode,
        allow_partial=args.allow_partial,
    )
    with injector as inj:
        result = evaluate_loss(model, tok, items, inj, batch_size=args.batch_size, progress=not args.json)
    label = recipes.recipe_id(inj.weight_format, inj.input_format) + (f"+{args.transform}" if args.transform else "")
    recipe = {"format": label, "point": inj.point, "weight_format": inj.weight_format}
    recipe |= {"input_format": inj.input_format, "transform": args.transform, "scale_mode": args.scale_mode}
    recipe |= {"dtype": _dtype_name(model), "modules": len(inj.modules), "coverage": inj.coverage.to_json()}
    settings = {
        "model": {"name": args.model, **model_identity(model)},
        "recipe": recipe,
        "first_item": args.first_item,
        "item_digests": item_digests(i.text for i in items),
    }
    return result, settings, inj


def loss_document(result, settings: dict):
    """The ``eval loss --json`` document of a :func:`loss_run` (``settings`` JSON-able, so item
    shards of one job can be merged: their ``item_digests`` concatenated in item order)."""
    from harness.peritem import dataset_of_digests

    first, digests = settings["first_item"], settings["item_digests"]
    return result.document(
        model=settings["model"],
        recipe=settings["recipe"],
        dataset=dataset_of_digests("gsm8k test", digests),
        item_ids=tuple(range(first, first + len(digests))),
    )


def _eval_loss(args: argparse.Namespace) -> int:
    result, settings, inj = loss_run(args)
    if args.json:
        print(loss_document(result, settings).dumps())
        return 0
    summary, cmp = result.summary(), result.comparison()
    print(inj.coverage.line())
    print(
        f"model {args.model}, {settings['recipe']['format']} on {inj.point} of {settings['recipe']['modules']} "
        f"weights, {summary['n']} GSM8K test items, {summary['tokens']} answer tokens, {settings['recipe']['dtype']}"
    )
    for note in inj.notes:
        print(f"note: {note}")
    rows = [
        [REFERENCE, summary["reference_loss"], 0.0, 1.0],
        [settings["recipe"]["format"], summary["loss"], summary["kl"], summary["top1_agree"]],
    ]
    print(tabulate(rows, headers=["model", "loss", "kl", "top1_agree"], floatfmt=".4f"))
    print(
        f"paired difference (quantized - reference, per-item loss): {cmp.mean_diff:+.4f} "
        f"[95% CI {cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}], t-test p={cmp.p_value:.3g}, "
        f"Wilcoxon p={cmp.p_wilcoxon:.3g}, Cohen's d={cmp.cohens_d:.2f}, n={cmp.n}: {cmp.verdict}"
    )
    return 0


def _eval_gsm8k(args: argparse.Namespace) -> int:
    from harness.eval.gsm8k import lm_eval_table, run_gsm8k
    from harness.gsm8k import load_gsm8k
    from harness.models import model_identity
    from harness.peritem import dataset_of

    if args.output:
        atomic.check_target(args.output, atomic.Kind.GSM8K_RUN, args.force)
    # a bad file, or a --compare-to run on other items, is named before the model loads
    dataset = dataset_of("gsm8k test", [i.text for i in load_gsm8k("test", args.limit, args.gsm8k_dir)])
    compare_to = check_compare_to(args.compare_to, args.task, dataset) if args.compare_to else None
    model, tok = _load(args)
    runs = run_gsm8k(
        model,
        tok,
        args.task,
        model_name=args.model,
        dtype=_dtype_name(model),
        fmt=args.format,
        point=args.point,
        with_reference=not args.no_reference,
        compare_to={args.compare_to: compare_to} if compare_to is not None else None,
        scale_mode=args.scale_mode,
        seed=args.seed,
        progress=True,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data_dir=args.gsm8k_dir,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        tasks_dir=args.tasks_dir,
        allow_partial=args.allow_partial,
    )
    if runs.coverage:
        print(Coverage.from_json(runs.coverage).line())
    for name, result in runs.runs.items():
        print(f"\n{name}: {args.model}, {result.n} items, {result.settings['n_shot']}-shot\n{lm_eval_table(result)}")
    subject = args.format if args.format != NO_FORMAT else args.model
    for label, cmps in runs.comparisons.items():
        rows = [
            [m, c.mean_a, c.mean_b, c.mean_diff, f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]", c.p_value, c.verdict]
            for m, c in cmps.items()
        ]
        print(f"\n{subject} against {label} (paired, same items; means of per-item values):")
        print(tabulate(rows, headers=["metric", label, "now", "diff", "95% CI", "p", ""], floatfmt=".4f"))
    if args.output:
        doc = runs.document(model={"name": args.model, **model_identity(model)}, dataset=dataset)
        _write_json(args.output, doc.to_json())
    return 0


def _bits_arg(text: str) -> float:
    """Bits per weight in (0, 16]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (valid: bits per weight in (0, 16])") from None
    if not 0 < value <= 16:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range (valid: bits per weight in (0, 16])")
    return value


def _scan(args: argparse.Namespace) -> int:
    from harness.gsm8k import load_gsm8k
    from harness.models import model_key
    from harness.srdd.report import fill_report, markdown_summary
    from harness.srdd.sensitivity import DEFAULT_MODE
    from harness.validate import UsageError

    check_scan_options(args.attribution not in (None, "none"), args.eval_items, args.instability_runs)
    if args.control_items is not None and args.control_items > args.heldout_items:
        raise UsageError(
            f"--control-items {args.control_items} exceeds --heldout-items {args.heldout_items} "
            f"(valid: 1 to {args.heldout_items})"
        )
    if args.output:
        atomic.check_target(args.output, atomic.Kind.SCAN, args.force)
    if args.report_dir:
        atomic.check_target(args.report_dir, atomic.Kind.SCAN_REPORT, args.force)
    mode = args.attribution or (DEFAULT_MODE if args.eval_items else "none")
    thresholds = _from_options(args, srdd_criteria.Thresholds, SCAN_THRESHOLDS)
    calibration = load_gsm8k("train", args.prompts, args.gsm8k_dir)
    n_eval = args.eval_items + args.heldout_items if args.eval_items else 0
    test_items = load_gsm8k("test", n_eval, args.gsm8k_dir) if n_eval else []
    evaluation, heldout = test_items[: args.eval_items], test_items[args.eval_items :]
    if n_eval and len(heldout) < args.heldout_items:
        raise UsageError(
            f"--eval-items {args.eval_items} + --heldout-items {args.heldout_items} need {n_eval} GSM8K test items; "
            f"the test split has {len(test_items)}"
        )
    model, tok = _load(args)
    doc = srdd_run.scan_model(
        model,
        tok,
        calibration,
        args.format,
        args.point,
        model_name=model_key(args.model),
        thresholds=thresholds,
        evaluation=evaluation,
        heldout=heldout,
        attribution=mode,
        control_draws=args.control_draws,
        control_items=args.control_items,
        budget_bits=args.budget_bits,
        gain=not args.no_gain,
        instability_runs=args.instability_runs,
        batch_size=args.batch_size,
        progress=True,
        allow_partial=args.allow_partial,
    )
    with atomic.Transaction() as tx:  # the report and --output together, all-or-nothing
        if args.report_dir:
            fill_report(doc, tx.folder(args.report_dir))
        if args.output:
            doc.write(tx.file(args.output))
    if args.report_dir:
        print(f"report: {Path(args.report_dir, 'summary.md')}")
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


def _aqn_preflight(args: argparse.Namespace) -> int:
    from harness.aqn.configs import load_config
    from harness.gsm8k import load_gsm8k

    config = load_config(args.config)
    config.schedule(total_steps=config.num_stages)  # fail before loading anything
    thresholds = _from_options(args, aqn_preflight.Thresholds, PREFLIGHT_THRESHOLDS)
    items = load_gsm8k("test", args.items, args.gsm8k_dir)
    model, tok = _load(args)
    result = aqn_preflight.preflight(
        model,
        tok,
        items,
        config,
        fmt=args.format,
        point=args.point,
        draws=args.draws,
        seed=args.seed,
        answer_lines=args.answer_lines,
        batch_size=args.batch_size,
        thresholds=thresholds,
        allow_partial=args.allow_partial,
    )
    if args.output:
        _write_json(args.output, result.as_dict())
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.coverage_line)
    print(tabulate([[k, v] for k, v in result.as_dict().items() if not isinstance(v, (dict, list))], floatfmt=".4f"))
    print(tabulate(result.draws, headers="keys", floatfmt=".4f"))
    li, t1 = result.loss_increase, result.top1_agree
    print(
        f"{config.name}: {result.verdict.upper()} (the mean over noise draws): loss {li.mean:+.1%} "
        f"[95% CI {li.low:+.1%}, {li.high:+.1%}], top-1 agreement {t1.mean:.3f} [{t1.low:.3f}, {t1.high:.3f}] "
        f"over {len(result.draws)} draws x {result.items} items (risky: > {thresholds.risky_loss_increase:.0%} or "
        f"< {thresholds.risky_top1:.2f}; collapse: > {thresholds.collapse_loss_increase:.0%} or "
        f"< {thresholds.collapse_top1:.2f})\n"
        f"one draw (what one training step sees): {result.draw_verdict.upper()}: loss 95% prediction interval "
        f"{li.draw_low:+.1%} to {li.draw_high:+.1%}, top-1 agreement {t1.draw_low:.3f} to {t1.draw_high:.3f}"
    )
    return 0


def _aqn_compare(args: argparse.Namespace) -> int:
    from harness.aqn.configs import load_config
    from harness.aqn.report import aqn_markdown, report_paths, write_comparison
    from harness.gsm8k import load_gsm8k
    from harness.models import model_key

    config = load_config(args.config)
    config.schedule(args.steps)
    strategies = args.strategies.split(",")
    if args.output:
        for path in report_paths(args.output):  # a .json name is refused before any training
            atomic.check_target(path, atomic.Kind.AQN_REPORT, args.force)
    problematic, how = aqn_train.problematic_layers(strategies, args.attribution, model=args.model, fmt=args.format)
    train = load_gsm8k("train", args.train_items, args.gsm8k_dir)
    evaluation = load_gsm8k("test", args.eval_items, args.gsm8k_dir)
    model, tok = _load(args)
    quantized = QuantInjector(model, args.format, "weight")  # what training quantizes (partial: exit 2)
    quantized.select()
    print(quantized.coverage.line())
    comparison = aqn_train.compare_strategies(
        model,
        tok,
        train,
        evaluation,
        fmt=args.format,
        config=config,
        strategies=strategies,
        seeds=list(range(args.seeds)),
        steps=args.steps,
        problematic=problematic,
        train_batch_size=args.train_batch_size,
        eval_batch_size=args.batch_size,
        progress=True,
    )
    report = (model_key(args.model), problematic, how)
    print(write_comparison(args.output, comparison, *report) if args.output else aqn_markdown(comparison, *report))
    return 0


def _gate(args: argparse.Namespace) -> int:
    """Exit 0 pass, 1 a measured regression, 2 anything else, with one line per gated metric (or
    one line naming the file and the problem), never a traceback."""
    from harness.gate import GateError, gate_files

    if args.sweep:
        from harness.sweep.report import gate_sweeps

        lines, code = gate_sweeps(
            args.baseline, args.candidate, metrics=args.metric, alpha=args.alpha, margin=args.margin
        )
        print("\n".join(lines))
        return code
    try:
        report = gate_files(args.baseline, args.candidate, metrics=args.metric, alpha=args.alpha, margin=args.margin)
    except GateError as err:  # a bad --alpha / --margin
        print(f"error: {err}")
        return 2
    except Exception as err:  # the exit code is a contract: 1 only for a measured regression
        print(f"error: the gate failed on {args.baseline} / {args.candidate}: {type(err).__name__}: {err}")
        return 2
    print("\n".join(report.lines()))
    return report.exit_code


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweep import run
    from harness.sweep.report import write_report

    if args.plan == "report":
        if not args.dir:
            raise ValueError("sweep report needs the sweep folder: python -m harness sweep report DIR")
        print("\n".join(f"wrote {p}" for p in write_report(args.dir)))
        return 0
    if args.dir or not args.out:
        raise ValueError("usage: python -m harness sweep PLAN.toml --out DIR (or: sweep report DIR)")
    return run.main(args.plan, args.out, address=args.address, num_cpus=args.num_cpus)


def _model_options(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares (:func:`_load` reads them)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or local HF directory")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="default: the dtype the model is stored in (float32 if none)",
    )
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument(
        "--batch-size",
        type=count_arg(1),
        default=EVAL_BATCH_SIZE,
        help="sequences per evaluation forward pass (default %(default)s)",
    )
    p.add_argument(
        "--gsm8k-dir", default=None, help="GSM8K folder (default: $HARNESS_GSM8K_DIR, else the copy in the package)"
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--device-map", choices=["auto"], help="auto: spread the model over the visible devices (accelerate)"
    )
    p.add_argument(
        "--max-memory", type=_max_memory_arg, help="with --device-map auto: e.g. 0=20GiB,1=20GiB,cpu=60GiB,disk=900GB"
    )


def _max_memory_arg(text: str) -> dict:
    try:
        return parse_max_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _allow_partial_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept weights the harness cannot quantize (the report's first lines say which); default: exit 2",
    )


def _dtype_name(model) -> str:
    """The loaded model's dtype by its ``--dtype`` name."""
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def _load(args: argparse.Namespace):
    """``(model, tokenizer)`` from the :func:`_model_options` of ``args``."""
    from harness.models import load_model

    return load_model(
        args.model,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
        max_memory=args.max_memory,
    )


def _write_json(path: str, doc: dict) -> None:
    atomic.write_text(path, json.dumps(doc, indent=2))
    print(f"\nwrote {path}")


# Options that set a field of a library dataclass: field -> flag; default and type from the field.
SCAN_THRESHOLDS = {
    "sqnr_db": "--sqnr-threshold",
    "deadzone_ratio": "--deadzone-threshold",
    "saturation_ratio": "--saturation-threshold",
    "relative_error": "--relative-error-threshold",
    "kurtosis_ratio": "--kurtosis-ratio-threshold",
    "gain_ratio": "--gain-ratio-threshold",
}
PREFLIGHT_THRESHOLDS = {
    "risky_loss_increase": "--risky-loss",
    "risky_top1": "--risky-top1",
    "collapse_loss_increase": "--collapse-loss",
    "collapse_top1": "--collapse-top1",
}


def _field_options(p: argparse.ArgumentParser, cls, flags: dict[str, str], what: str) -> None:
    """One float option per field of the dataclass ``cls``, named by ``flags``, defaulting to the field's default."""
    for f in fields(cls):
        default = "off" if f.default is None else f.default
        p.add_argument(
            flags[f.name],
            dest=f.name,
            type=float,
            default=f.default,
            metavar="X",
            help=f"{what} on {f.name} (default {default})",
        )


def _from_options(args: argparse.Namespace, cls, flags: dict[str, str]):
    """The dataclass ``cls`` from the options :func:`_field_options` added."""
    return cls(**{name: getattr(args, name) for name in flags})


def _force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output even when it is not a harness document of this kind",
    )


def _recipe_options_add(p: argparse.ArgumentParser) -> None:
    """--format/--point (one format), or --weight-format/--input-format, or --recipe."""
    p.add_argument("--format", choices=list_formats(), help="one format at --point (or use the options below)")
    p.add_argument("--point", default=None, choices=Point.choices(), help="with --format or one side's format: where")
    p.add_argument("--weight-format", choices=list_formats(), help="the weights' format (a recipe's W side)")
    p.add_argument("--input-format", choices=list_formats(), help="the Linear inputs' format (a recipe's A side)")
    p.add_argument("--recipe", choices=recipes.list_recipes(), help="a named pair (python -m harness recipes)")
    p.add_argument("--transform", choices=Transform.choices(), help="rotate weights and inputs first (block Hadamard)")


def _recipe_options(args: argparse.Namespace) -> dict:
    """QuantInjector's format arguments from the options; a usage error names the valid ways."""
    given = [o for o in ("format", "weight_format", "input_format", "recipe") if getattr(args, o)]
    if not given:
        raise ValueError("name the formats: --format F [--point P], --weight-format/--input-format, or --recipe")
    if (args.recipe or args.format) and len(given) > 1:
        first, second = (g.replace("_", "-") for g in given[:2])
        raise ValueError(f"--{first} and --{second} exclude each other")
    sides = {
        "fmt": None,
        "point": "weight",
        "weight": None,
        "input": None,
        "recipe": args.recipe,
        "per_tensor_scale": None,
    }
    if args.format:
        sides |= {"fmt": args.format, "point": args.point or "weight"}
    elif not args.recipe:
        weight, inp = args.weight_format, args.input_format
        if args.point and not (weight and inp):  # one side named with --point: that side
            only = weight or inp
            weight, inp = (
                (only if args.point in ("weight", "both") else None),
                (only if args.point in ("input", "both") else None),
            )
        sides |= {"weight": weight, "input": inp}
    return sides


def _recipes(args: argparse.Namespace) -> int:
    rows = [[r.name, r.weight or "-", r.input or "-", "two-level" if r.per_tensor_scale else "", r.deployment]
            for r in recipes.RECIPES.values()]  # fmt: skip
    print(tabulate(rows, headers=["recipe", "weight", "input", "nvfp4 scale", "deployment"]))
    return 0


def _scale_mode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale-mode",
        default=ScaleMode.FLOOR.value,
        choices=ScaleMode.choices(),
        help="E8M0 shared-exponent rule (default: %(default)s, OCP)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("formats", help="list the registered quantization formats").set_defaults(run=_formats)
    commands.add_parser("recipes", help="list the named weight/input recipes").set_defaults(run=_recipes)

    evaluate = commands.add_parser("eval", help="evaluate a quantized model").add_subparsers(dest="what", required=True)
    loss = evaluate.add_parser("loss", help="answer-token loss, KL and top-1 agreement vs the reference model")
    _model_options(loss)
    _recipe_options_add(loss)
    loss.add_argument(
        "--items", type=count_arg(1), default=LOSS_ITEMS, help="first N GSM8K test items (default %(default)s)"
    )
    loss.add_argument(
        "--first-item", type=count_arg(0), default=0, help="skip this many test items first (a sweep's item shards)"
    )
    loss.add_argument("--seed", type=int, default=0, help="seed of stochastic formats")
    _scale_mode_option(loss)
    loss.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _allow_partial_option(loss)
    loss.set_defaults(run=_eval_loss)

    gs = evaluate.add_parser("gsm8k", help="GSM8K through lm-eval on the quantized model, vs the reference")
    _model_options(gs)
    gs.add_argument(
        "--format", default=NO_FORMAT, choices=[NO_FORMAT, *list_formats()], help=f"{NO_FORMAT}: the model as it is"
    )
    gs.add_argument("--point", default=Point.WEIGHT.value, choices=Point.choices())
    gs.add_argument(
        "--task", default=Gsm8kTask.GSM8K.value, choices=Gsm8kTask.choices(), help="gsm8k (exact match) or gsm8k_bpb"
    )
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
    _force_option(gs)
    _allow_partial_option(gs)
    gs.set_defaults(run=_eval_gsm8k)

    sc = commands.add_parser("scan", help="SRDD scan: per-layer detectors, findings, recommendation, report")
    _model_options(sc)
    sc.add_argument("--format", required=True, choices=list_formats())
    sc.add_argument("--point", default=Point.WEIGHT.value, choices=Point.choices())
    sc.add_argument(
        "--prompts",
        type=count_arg(1),
        default=CALIBRATION_ITEMS,
        help="calibration texts from GSM8K train (default %(default)s)",
    )
    _field_options(sc, srdd_criteria.Thresholds, SCAN_THRESHOLDS, "absolute threshold")
    sc.add_argument(
        "--eval-items",
        type=count_arg(0),
        default=LOSS_ITEMS,
        help="GSM8K test items 0..N-1 for the attribution, which chooses the recommendation (0: skip "
        "attribution and verification; default %(default)s)",
    )
    sc.add_argument(
        "--heldout-items",
        type=count_arg(0),
        default=LOSS_ITEMS,
        help="the next GSM8K test items, disjoint from --eval-items, that verify the recommendation "
        "(0: no verification; default %(default)s)",
    )
    sc.add_argument(
        "--attribution",
        nargs="?",
        const="exact",
        choices=ATTRIBUTION_MODES,
        help="per-layer loss attribution with 95%% CIs: 'screen' (default) = Fisher screen of every layer "
        "(estimates) + exact rows for its top 5 and every layer a detector points at; 'exact' (the bare "
        "flag) = every layer exactly; 'none' = no attribution (floor rules only)",
    )
    sc.add_argument(
        "--control-draws",
        type=count_arg(1),
        default=CONTROL_DRAWS,
        help="seeded random proposals of the same size the recommendation is ranked against "
        "(confirmed only if control_p <= 0.05, which needs >= 19; default %(default)s)",
    )
    sc.add_argument(
        "--control-items",
        type=count_arg(1),
        default=None,
        help="measure the control draws on the first N held-out items only (cheaper; the rank "
        "statistic compares the proposal on the same items; default: all held-out items)",
    )
    sc.add_argument(
        "--budget-bits",
        type=_bits_arg,
        default=None,
        help="keep harmful layers in BF16 greedily while the average bits per weight stays within "
        "this budget (e.g. 4.5 for mxfp4; default: the decision framework's count)",
    )
    sc.add_argument("--no-gain", action="store_true", help="skip the gain scan")
    sc.add_argument(
        "--instability-runs",
        type=count_arg(0),
        default=None,
        help=f"runs of the instability scan (default: {srdd_run.STOCHASTIC_RUNS} for stochastic formats, "
        f"else {srdd_run.DETERMINISTIC_RUNS})",
    )
    sc.add_argument("--output", type=output_file_arg, help="write the scan JSON here")
    _allow_partial_option(sc)
    sc.add_argument(
        "--report-dir", type=output_dir_arg, help="write summary.md, results.json and PNG plots here (replaced whole)"
    )
    _force_option(sc)
    sc.set_defaults(run=_scan)

    aqn = commands.add_parser("aqn", help="AQN noise: pre-flight collapse check, strategy comparison")
    aqn_cmds = aqn.add_subparsers(dest="what", required=True)
    for name, helptext, run in (
        ("preflight", "ok / risky / collapse before any training", _aqn_preflight),
        ("compare", "train each strategy for the same steps and seeds, compare", _aqn_compare),
    ):
        p = aqn_cmds.add_parser(name, help=helptext)
        _model_options(p)
        p.add_argument("--format", default="mxfp4", choices=list_formats())
        p.add_argument("--config", default="qerl-default", help="a named configuration or a JSON file")
        p.set_defaults(run=run)
        if name == "preflight":
            p.add_argument("--point", default=Point.WEIGHT.value, choices=Point.choices())
            p.add_argument(
                "--items",
                type=count_arg(1),
                default=aqn_preflight.ITEMS,
                help="GSM8K test items (default %(default)s)",
            )
            p.add_argument(
                "--draws",
                type=count_arg(2),
                default=aqn_preflight.DRAWS,
                help="seeded noise draws (default %(default)s)",
            )
            p.add_argument(
                "--answer-lines",
                type=count_arg(0),
                default=aqn_preflight.ANSWER_LINES,
                help="answer lines scored per item (0: all; default %(default)s)",
            )
            p.add_argument("--seed", type=int, default=0, help="first noise seed (draw d uses seed + d)")
            _field_options(p, aqn_preflight.Thresholds, PREFLIGHT_THRESHOLDS, "verdict line")
            p.add_argument("--json", action="store_true")
            p.add_argument("--output", type=output_file_arg, help="write the pre-flight JSON here")
            _allow_partial_option(p)
        else:
            p.add_argument(
                "--strategies",
                default=",".join(aqn_train.STRATEGIES),
                help=f"comma-separated, of {', '.join(aqn_train.Strategy.choices())} (default: all)",
            )
            p.add_argument(
                "--seeds",
                type=count_arg(2),
                default=aqn_train.SEEDS,
                help="training runs per strategy, the unit (default %(default)s)",
            )
            settings = aqn_train.TrainSettings()
            p.add_argument("--steps", type=count_arg(1), default=settings.steps)
            p.add_argument(
                "--train-batch-size",
                type=count_arg(1),
                default=settings.batch_size,
                help="training sequences per step (default %(default)s)",
            )
            p.add_argument("--train-items", type=count_arg(1), default=aqn_train.TRAIN_ITEMS)
            p.add_argument("--eval-items", type=count_arg(1), default=LOSS_ITEMS)
            p.add_argument(
                "--attribution", help="a scan JSON with per-layer attribution CIs: picks the targeted layers"
            )
            p.add_argument(
                "--output", type=output_file_arg, help="write the markdown table here (and the JSON beside it)"
            )
            _force_option(p)

    gate = commands.add_parser(
        "gate",
        help="paired gate of CANDIDATE against BASELINE: exit 0 pass, 1 regression, 2 inconclusive / not comparable "
        "/ unreadable",
    )
    gate.add_argument("baseline", help="a per-item document: `eval gsm8k --output` or `eval loss --json`")
    gate.add_argument("candidate", help="the same kind of document, on the same items")
    gate.add_argument(
        "--metric",
        action="append",
        help="gate this metric (repeat for several: Holm-corrected together); default: exact match (strict), "
        "bits per byte or loss, or the only shared one",
    )
    gate.add_argument("--alpha", type=float, default=ALPHA, help="one-sided significance level (default %(default)s)")
    gate.add_argument("--margin", type=float, help="largest drop that passes, metric's unit (default: per metric)")
    gate.add_argument("--sweep", action="store_true", help="BASELINE and CANDIDATE are sweep folders: gate every job")
    gate.set_defaults(run=_gate)

    sw = commands.add_parser("sweep", help="run a TOML plan of model x format x point x job as Ray tasks")
    sw.add_argument("plan", help="the plan (see docs/sweeps.md), or `report` to rewrite DIR's summary and heatmap")
    sw.add_argument("dir", nargs="?", help="with `report`: the sweep folder")
    sw.add_argument("--out", help="the sweep folder (documents, summary.md, heatmap.png)")
    sw.add_argument("--address", help="a running Ray cluster: auto or HOST:PORT (default: start a local instance)")
    sw.add_argument("--num-cpus", type=count_arg(1), help="CPUs of the local Ray instance (default: all)")
    sw.set_defaults(run=_sweep)

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
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying what was (not) written
        what = str(err) or "before any output was written (outputs are written all-or-nothing at the end)"
        parser.exit(130, f"interrupted: {what}\n")


if __name__ == "__main__":
    sys.exit(main())
