"""Each deployed format (FP8 / INT8 / INT4 per tensor, row, group, tile) equals the library its
registry entry names (``Format.library``) bit for bit, on normal, Student-t, tie, tiny-amax and
all-zero data in fp32 and bf16: torchao's ``Float8Tensor`` per-row primitives and ``Int8Tensor``
(``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine``), compressed-tensors'
``fake_quantize`` with ``calculate_qparams`` for the matching ``QuantizationArgs``, and, for
vLLM's dialects (vLLM does not install on CPU), the plain-Python references in
``suites/formats/reference.py`` that cite the vLLM function each follows."""

from __future__ import annotations

import pytest
import torch

from harness.formats import fake_quantize, get_format
from harness.testing import assert_same_bits, format_params
from suites.formats import data
from suites.formats.reference import VLLM_REFERENCES

primitives = pytest.importorskip("torchao.quantization.quant_primitives")
int8_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.int8.int8_tensor")
ct_args = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402
from torchao.quantization.granularity import PerRow, PerTensor  # noqa: E402

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
SHAPE = (256, 384)  # whole 128x128 tiles and 1x128 groups


def _ties(name: str) -> torch.Tensor:
    """Every group's max at ``divisor * 2**k`` (so the scale is ``2**k`` up to rounding) and
    the other elements on midpoints between neighbouring codes: round-half-to-even decides."""
    fmt = get_format(name)
    g = data.generator(7)
    grid = torch.tensor(fmt.element.grid())
    mids = (grid[1:] + grid[:-1]) / 2
    signs = torch.where(torch.rand(SHAPE, generator=g) < 0.5, -1, 1)
    values = mids[torch.randint(len(mids), SHAPE, generator=g)] * signs
    values[:, ::128] = fmt.scale.divisor
    return values * 2.0 ** torch.randint(-6, 7, (SHAPE[0], 1), generator=g).float()


DATA = {
    "normal": lambda name: data.normal(SHAPE, seed=60),
    "student_t": lambda name: data.student_t(SHAPE, seed=61, df=3),
    "ties": _ties,
    "tiny_amax": lambda name: data.normal(SHAPE, seed=62) * 1e-30,
    "all_zero": lambda name: torch.zeros(SHAPE),
}


def torchao_fp8_row(x: torch.Tensor) -> torch.Tensor:
    block = [1, x.shape[-1]]
    scale = primitives._choose_scale_float8(x, block, torch.float8_e4m3fn, hp_value_lb=1e-12)
    q = primitives._quantize_affine_float8(x, scale, torch.float8_e4m3fn)
    return primitives._dequantize_affine_float8(q, scale, x.dtype)


def torchao_int8(x: torch.Tensor, granularity) -> torch.Tensor:
    return int8_tensor.Int8Tensor.from_hp(x, granularity).dequantize()


CT_ARGS = {
    "fp8_e4m3_tensor": dict(num_bits=8, type="float", symmetric=True, strategy="tensor"),
    "fp8_e4m3_g128": dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=128),
    "fp8_e4m3_b128": dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[128, 128]),
    "int4_g128": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128),
    "int4_g128_asym": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
}


def compressed_tensors(x: torch.Tensor, name: str) -> torch.Tensor:
    """compressed-tensors' fake_quantize, with the scale and zero point its observers compute
    (``calculate_qparams`` of each group's min and max, in the tensor's dtype)."""
    args = ct_args.QuantizationArgs(**CT_ARGS[name])
    if args.strategy == "tensor":
        lo, hi = x.amin(), x.amax()
    elif args.strategy == "group":
        groups = x.unflatten(-1, (-1, args.group_size))
        lo, hi = groups.amin(-1), groups.amax(-1)
    else:
        r, c = args.block_structure
        tiles = x.reshape(x.shape[0] // r, r, x.shape[1] // c, c)
        lo, hi = tiles.amin((1, 3)), tiles.amax((1, 3))
    scale, zero_point = calculate_qparams(lo, hi, args)
    return ct_fake_quantize(x, scale, zero_point, args)


REFERENCES = {
    "fp8_e4m3_row": torchao_fp8_row,
    "int8_row": lambda x: torchao_int8(x, PerRow()),
    "int8_tensor": lambda x: torchao_int8(x, PerTensor()),
    **{name: (lambda x, name=name: compressed_tensors(x, name)) for name in CT_ARGS},
    **VLLM_REFERENCES,
}


def test_every_deployed_format_has_a_reference_here() -> None:
    deployed = {p.id for p in format_params(where=lambda f: not f.microscaling)}
    assert deployed == set(REFERENCES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", format_params(REFERENCES))
def test_identical_bits_to_the_named_library(name: str, kind: str, dtype: torch.dtype, device: torch.device) -> None:
    x = DATA[kind](name).to(dtype)
    expected = REFERENCES[name](x).to(dtype)
    if name in CT_ARGS and CT_ARGS[name]["type"] == "int":
        # compressed-tensors' fake_quantize rounds in floating point and keeps a -0 that its integer
        # codes (quantize() -> int8) cannot hold; the harness follows the codes: its zeros are +0.
        expected = expected + 0.0
    got = fake_quantize(x.to(device), name).cpu()
    assert_same_bits(got, expected, f"{name}/{kind}/{dtype}")
    if kind == "all_zero":
        assert_same_bits(got, torch.zeros_like(x))
