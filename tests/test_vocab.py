"""The vocabularies and registries (``harness.vocab``): one error shape for every bad name, the
CLI's choices taken from them, and the scale-mode code the kernels take."""

from __future__ import annotations

import argparse
import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.aqn import configs, noise, train
from harness.cli import build_parser
from harness.eval import gsm8k as eval_gsm8k
from harness.formats import (
    FORMATS,
    SCALE_MODES,
    ScaleCode,
    ScaleMode,
    fake_quantize,
    fast,
    get_format,
    list_formats,
    quant,
    scales,
)
from harness.gsm8k import SPLITS as GSM8K_SPLITS
from harness.gsm8k import Split, gsm8k_file
from harness.inject import POINTS, Point
from harness.policy import Tolerance
from harness.recipes import RECIPES, get_recipe, list_recipes
from harness.transforms import Transform, check_transform
from harness.vocab import Registry, UnknownName, Vocab

KERNEL_C = Path(fast.__file__).with_name("fast_kernel.c")

# (what is looked up, the lookup through the public entry point, kind, plural, every valid name)
LOOKUPS: dict[str, tuple[Callable[[str], object], str, str, list[str]]] = {
    "formats": (get_format, "format", "formats", list_formats()),
    "recipes": (get_recipe, "recipe", "recipes", list_recipes()),
    "aqn configs": (configs.get_config, "AQN configuration", "AQN configurations", list(configs.CONFIGS)),
    "points": (Point.parse, "injection point", "injection points", ["weight", "input", "both"]),
    "backends": (
        lambda b: fake_quantize(torch.ones(32), "mxfp4", backend=b),
        "backend",
        "backends",
        ["auto", "reference", "fast"],
    ),
    "scale modes": (
        lambda m: get_format("mxfp4").with_scale_mode(m),
        "scale_mode",
        "scale modes",
        ["floor", "ceil", "even", "rceil"],
    ),
    "nvfp4 scale modes": (  # an unknown word is unknown before it is an E8M0-only rule
        lambda m: fake_quantize(torch.ones(16), "nvfp4", scale_mode=m),
        "scale_mode",
        "scale modes",
        ["floor", "ceil", "even", "rceil"],
    ),
    "strategies": (
        lambda s: train.strategy_targets(s, ["layers.0"], []),
        "AQN strategy",
        "AQN strategies",
        ["none", "global", "targeted", "healthy"],
    ),
    "tasks": (eval_gsm8k.check_task, "GSM8K task", "GSM8K tasks", ["gsm8k", "gsm8k_bpb"]),
    "splits": (gsm8k_file, "GSM8K split", "GSM8K splits", ["test", "train"]),
    "transforms": (check_transform, "transform", "transforms", ["hadamard"]),
    "layer types": (noise.LayerType.parse, "layer type", "layer types", ["rmsnorm", "linear"]),
    "noise scales": (noise.NoiseScale.parse, "noise scale", "noise scales", ["absolute", "relative"]),
    "tolerance kinds": (lambda k: Tolerance(k, 0.1), "tolerance kind", "tolerance kinds", ["abs", "rel"]),
}


@pytest.mark.parametrize("what", list(LOOKUPS))
def test_a_bad_name_gets_one_line_naming_it_and_every_valid_choice(what: str) -> None:
    lookup, kind, plural, valid = LOOKUPS[what]
    with pytest.raises(UnknownName) as err:
        lookup("bogus-Name")
    assert str(err.value) == f"unknown {kind} 'bogus-Name'; valid {plural}: {', '.join(valid)}"
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    assert (err.value.kind, err.value.value, err.value.valid) == (kind, "bogus-Name", tuple(valid))


@pytest.mark.parametrize("bad", [None, 3, ["weight"]])
def test_a_name_of_the_wrong_type_gets_the_same_line(bad: object) -> None:
    for lookup in (Point.parse, get_format):
        with pytest.raises(UnknownName, match=rf"^unknown \w[\w ]* {re.escape(repr(bad))}; valid \w+"):
            lookup(bad)


def test_every_vocabulary_is_a_documented_str_enum_its_module_exports_as_plain_strings() -> None:
    exported = {
        Point: POINTS,
        quant.Backend: quant.BACKENDS,
        ScaleMode: SCALE_MODES,
        train.Strategy: train.STRATEGIES,
        noise.LayerType: noise.LAYER_TYPES,
        noise.NoiseScale: noise.SCALES,
        Split: GSM8K_SPLITS,
    }
    for vocab, names in exported.items():
        assert issubclass(vocab, (Vocab, enum.StrEnum)) and vocab.__doc__
        assert names == vocab.choices() == tuple(m.value for m in vocab) == tuple(vocab)
        assert all(type(n) is str for n in names)  # PyYAML's safe_dump, for one, wants a plain str
    assert list(eval_gsm8k.TASKS) == list(eval_gsm8k.Task) and all(type(t) is str for t in eval_gsm8k.TASKS)
    assert list(Transform) == ["hadamard"]


def test_members_are_their_plain_strings() -> None:
    """Code and stored JSON that use the strings keep working."""
    assert Point.BOTH == "both" and f"{Point.BOTH}" == "both" and repr(Point.BOTH) == "'both'"
    assert json.dumps({"point": Point.INPUT, "mode": ScaleMode.RCEIL}) == '{"point": "input", "mode": "rceil"}'
    assert {"weight": 1}[Point.WEIGHT] == 1 and Point.parse(Point.WEIGHT) is Point.WEIGHT
    assert get_format("mxfp4").with_scale_mode("ceil") == get_format("mxfp4").with_scale_mode(ScaleMode.CEIL)
    assert eval_gsm8k.TASKS["gsm8k_bpb"] == "harness_gsm8k_bpb"


@dataclass(frozen=True)
class _Entry:
    name: str


def test_a_registry_refuses_a_second_entry_under_a_taken_name() -> None:
    with pytest.raises(ValueError, match=r"^thing 'a' is already registered$"):
        Registry("thing", [_Entry("a"), _Entry("b"), _Entry("a")])
    things = Registry("thing", [_Entry("a")])
    with pytest.raises(ValueError, match="already registered"):
        things["a"] = _Entry("a")
    assert things.register(_Entry("b")) == _Entry("b") and things.names() == ["a", "b"]
    for registry in (FORMATS, RECIPES, configs.CONFIGS):
        before = dict(registry)
        first = next(iter(registry.values()))
        with pytest.raises(ValueError, match=f"'{first.name}' is already registered"):
            registry.register(first)
        assert dict(registry) == before


def test_a_registry_is_still_a_dict() -> None:
    assert FORMATS.get("nope", None) is None and FORMATS.get("mxfp4") is FORMATS["mxfp4"]
    assert "nvfp4" in FORMATS and "NVFP4" not in FORMATS and list(FORMATS) == list_formats()
    with pytest.raises(KeyError):
        FORMATS["nope"]


def _parser(*words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _choices(parser: argparse.ArgumentParser, option: str) -> list[str]:
    return list(next(a for a in parser._actions if option in a.option_strings).choices)


@pytest.mark.parametrize(
    ("command", "option", "vocab"),
    [
        (("eval", "loss"), "--point", Point),
        (("eval", "loss"), "--scale-mode", ScaleMode),
        (("eval", "loss"), "--transform", Transform),
        (("eval", "gsm8k"), "--point", Point),
        (("eval", "gsm8k"), "--task", eval_gsm8k.Task),
        (("eval", "gsm8k"), "--scale-mode", ScaleMode),
        (("scan",), "--point", Point),
        (("aqn", "preflight"), "--point", Point),
    ],
)
def test_the_cli_choices_are_the_vocabulary(command: tuple[str, ...], option: str, vocab: type[Vocab]) -> None:
    choices = _choices(_parser(*command), option)
    assert choices == [m.value for m in vocab] and all(type(c) is str for c in choices)


def test_the_cli_format_and_recipe_choices_are_the_registries() -> None:
    loss = _parser("eval", "loss")
    for option in ("--format", "--weight-format", "--input-format"):
        assert _choices(loss, option) == list(FORMATS)
    assert _choices(loss, "--recipe") == list(RECIPES)
    assert _choices(_parser("scan"), "--format") == list(FORMATS)


def test_a_bad_cli_choice_is_listed_by_its_plain_strings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser("eval", "loss").parse_args(["--model", "tiny-llama", "--format", "mxfp4", "--point", "weights"])
    line = next(line for line in capsys.readouterr().err.splitlines() if "--point" in line and "invalid" in line)
    assert line.endswith("argument --point: invalid choice: 'weights' (choose from 'weight', 'input', 'both')")


def _c_kernel_codes() -> dict[str, int]:
    """The C kernel's own table: ``scale_mode; /* E8M0 shared exponent: 0 floor, 1 ceil, ... */``."""
    comment = re.search(r"int32_t scale_mode; /\* E8M0 shared exponent: ([^*]+)\*/", KERNEL_C.read_text())
    assert comment, "params_t.scale_mode's comment in fast_kernel.c lists the codes"
    return {name: int(code) for code, name in re.findall(r"(\d+) (\w+)", comment.group(1))}


def test_the_kernel_scale_code_is_an_int_enum_with_the_c_kernels_values() -> None:
    assert issubclass(ScaleCode, enum.IntEnum)
    assert {c.name.lower(): c.value for c in ScaleCode} == _c_kernel_codes()
    assert [m.code for m in ScaleMode] == list(ScaleCode) and [c.name for c in ScaleCode] == [m.name for m in ScaleMode]
    # The code is the index in SCALE_MODES the kernels were given before the enum.
    assert all(ScaleMode(m).code == SCALE_MODES.index(m) for m in SCALE_MODES)
    x = torch.randn(4, 64)
    for mode in ScaleMode:
        _, job = fast._tile_job(x, get_format("mxfp8_e4m3").with_scale_mode(mode), -1, None, None)
        assert type(job.scale_mode) is ScaleCode and job.scale_mode == _c_kernel_codes()[mode.value]
    _, job = fast._tile_job(x[:, :32], get_format("nvfp4"), -1, None, None)
    assert job.scale_mode is ScaleCode.FLOOR
    assert scales.ScaleCode is ScaleCode
