"""Parity with torchao's reference MX path (``MXTensor.to_mx(..., scaling_mode).dequantize()``,
each of the four ``ScaleCalculationMode`` rules) and ``NVFP4Tensor``: identical bits on normal,
heavy-tailed (Student-t df=2) and exact-tie data in fp32 and bf16, plus the two documented
places where the harness follows the spec instead."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import SCALE_MODES, fake_quantize, get_format, nvfp4_per_tensor_scale
from harness.testing import assert_same_bits, format_params
from suites.formats import data

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2  # noqa: E402

TORCHAO_ELEMENT = {
    "mxfp4": torch.float4_e2m1fn_x2,
    "mxfp6_e2m3": DTYPE_FP6_E2M3,
    "mxfp6_e3m2": DTYPE_FP6_E3M2,
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
}
TORCHAO_FORMATS = format_params([*TORCHAO_ELEMENT, "nvfp4"])
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
DATA = {
    "normal": lambda fmt: data.normal((64, 256), seed=10),
    "student_t": lambda fmt: data.student_t((64, 256), seed=11),
    "ties": lambda fmt: data.exact_ties(fmt, (64, 256), seed=12),
}


def torchao_fake_quantize(
    x: torch.Tensor, name: str, per_tensor_scale: torch.Tensor | None = None, scale_mode: str = "floor"
) -> torch.Tensor:
    if name == "nvfp4":
        return nv.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_scale).dequantize(x.dtype)
    t = mx.MXTensor.to_mx(x, TORCHAO_ELEMENT[name], 32, scaling_mode=ScaleCalculationMode(scale_mode))
    return t.dequantize(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", TORCHAO_FORMATS)
def test_identical_bits_to_torchao(name: str, kind: str, dtype: torch.dtype) -> None:
    x = DATA[kind](get_format(name)).to(dtype)
    assert_same_bits(fake_quantize(x, name), torchao_fake_quantize(x, name), f"{name}/{kind}/{dtype}")


@pytest.mark.parametrize("mode", [m for m in SCALE_MODES if m != "floor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", format_params(TORCHAO_ELEMENT))
def test_scale_modes_identical_bits_to_torchao(name: str, dtype: torch.dtype, mode: str) -> None:
    """``scale_mode=`` ceil, even, rceil against torchao's ``ScaleCalculationMode`` of the same
    name, on the three data sets (floor is the test above)."""
    for kind, make in DATA.items():
        x = make(get_format(name)).to(dtype)
        got = fake_quantize(x, name, scale_mode=mode)
        assert_same_bits(got, torchao_fake_quantize(x, name, scale_mode=mode), f"{name}/{mode}/{kind}/{dtype}")
        if mode == "ceil":  # the modes do differ on this data: the test can tell them apart
            assert not torch.equal(got, fake_quantize(x, name))


@pytest.mark.nvfp4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "student_t"])
def test_nvfp4_two_level_identical_bits_to_torchao(kind: str, dtype: torch.dtype) -> None:
    x = DATA[kind](get_format("nvfp4")).to(dtype)
    pts = nvfp4_per_tensor_scale(x)
    assert_same_bits(fake_quantize(x, "nvfp4", per_tensor_scale=pts), torchao_fake_quantize(x, "nvfp4", pts))


@pytest.mark.parametrize("name", format_params(TORCHAO_ELEMENT))
def test_scale_2_pow_minus_127_follows_the_spec_not_torchao(name: str) -> None:
    """A block whose amax is below 2**(emax_elem - 126) gets the E8M0 scale 2**-127.  The spec
    dequantizes with 2**-127; torchao divides by 2**-126 but multiplies by 2**-127, which halves
    the block.  The harness keeps the block: its max element is reproduced within the format's
    relative precision, torchao's is not."""
    emax = get_format(name).element.emax
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0 ** (emax - 127)  # amax exponent emax-127 -> scale exponent -127
    x[0, 1] = 2.0 ** (emax - 128)
    ours, theirs = fake_quantize(x, name), torchao_fake_quantize(x, name)
    assert torch.equal(ours[0, :2], x[0, :2])  # both are exact grid points times 2**-127
    assert torch.equal(theirs[0, :2], x[0, :2] / 2)  # torchao's documented mismatch


@pytest.mark.parametrize("name", TORCHAO_FORMATS)
def test_inf_makes_the_block_nan_unlike_torchao(name: str) -> None:
    """The harness's rule: Inf anywhere in a block makes that block NaN (scale undefined);
    torchao saturates or propagates Inf instead.  Other blocks agree bit for bit."""
    x = data.normal((4, 64), seed=13)
    x[1, 5] = math.inf
    ours, theirs = fake_quantize(x, name), torchao_fake_quantize(x, name)
    block = get_format(name).block_size
    assert torch.isnan(ours[1, :block]).all()
    assert not torch.isnan(theirs[1, :block]).all()
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, :block] = False
    assert_same_bits(ours[keep], theirs[keep])
