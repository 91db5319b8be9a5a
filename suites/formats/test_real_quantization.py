"""Real quantization: ``fake_quantize(x) == dequantize(quantize(x))`` bit for bit (fake
quantization is exactly real quantization's error, which is what makes every later result
valid for real hardware), with codes and scales in the storage layout the spec defines."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import dequantize, fake_quantize, get_format, nvfp4_per_tensor_scale, quantize
from harness.formats.affine import IntElement, decode_elements
from harness.formats.elements import decode
from harness.testing import assert_same_bits, format_params
from suites.formats import data

ALL = format_params()
TORCH_FP8 = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    x = data.edge_magnitudes((16, 96), seed=40)
    x[3, 50] = math.nan
    x[9, 10] = math.inf
    return {
        "student_t": data.student_t((32, 128), seed=41),
        "ties": data.exact_ties(get_format(name), (64, 64), seed=42),
        "edges_nan_inf": x,
        "partial_3d": data.normal((3, 37, 45), seed=43),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ALL)
def test_fake_quantize_is_dequantize_of_quantize(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """On the suite's device; deterministic formats' codes and scales also equal the CPU's."""
    for kind, x in _inputs(name).items():
        x = x.to(dtype)
        q = quantize(x.to(device), name, generator=torch.Generator(device).manual_seed(7))
        fake = fake_quantize(x.to(device), name, generator=torch.Generator(device).manual_seed(7))
        assert_same_bits(dequantize(q).cpu(), fake.cpu(), f"{name}/{kind}/{dtype}")
        if device.type != "cpu" and not get_format(name).stochastic:
            on_cpu = quantize(x, name)
            assert torch.equal(q.codes.cpu(), on_cpu.codes) and torch.equal(q.scales.cpu(), on_cpu.scales), kind


@pytest.mark.nvfp4
def test_nvfp4_two_level_round_trip(device: torch.device) -> None:
    x = data.student_t((32, 128), seed=44).to(device)
    pts = nvfp4_per_tensor_scale(x)
    q = quantize(x, "nvfp4", per_tensor_scale=pts)
    assert q.per_tensor_scale is not None
    assert_same_bits(dequantize(q), fake_quantize(x, "nvfp4", per_tensor_scale=pts))


@pytest.mark.parametrize("name", format_params(where=lambda f: f.microscaling))
def test_storage_layout(name: str, device: torch.device) -> None:
    """uint8 codes and scales; FP4 packs two codes per byte; one scale per block; the storage
    cost is the format's bits per element."""
    fmt = get_format(name)
    x = data.normal((64, 256), seed=45).to(device)
    q = quantize(x, name, generator=torch.Generator(device).manual_seed(0))
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.uint8
    assert q.scales.numel() == x.numel() // fmt.block_size
    per_byte = 2 if fmt.element.bits == 4 else 1
    assert q.codes.numel() == x.numel() // per_byte
    assert q.nbytes * 8 / x.numel() == pytest.approx(
        fmt.bits_per_element + (8 - fmt.element.bits if per_byte == 1 else 0)
    )


@pytest.mark.parametrize("name", format_params(TORCH_FP8))
def test_fp8_codes_are_torch_float8_bits(name: str, device: torch.device) -> None:
    """Independent check of the element encoding: our FP8 codes equal the bits of torch's own
    float8 cast of the same grid values."""
    x = data.student_t((32, 128), seed=46).to(device)
    q = quantize(x, name)
    scales = torch.exp2(q.scales.float() - 127).unsqueeze(-1)
    grid_values = fake_quantize(x, name).reshape(q.codes.shape) / scales
    assert torch.equal(q.codes, grid_values.to(TORCH_FP8[name]).view(torch.uint8))


@pytest.mark.parametrize("name", format_params(where=lambda f: f.scale.name == "e8m0"))
def test_e8m0_scale_codes(name: str, device: torch.device) -> None:
    """E8M0 stores the biased exponent: 127 + floor(log2(amax)) - emax_elem, clamped at 0
    (2**-127) for tiny blocks, 255 for NaN."""
    fmt = get_format(name)
    x = torch.zeros(3, 64) if fmt.block_shape == (32,) else torch.zeros(3, 64, 64)
    x[0, ...] = 3.0  # floor(log2(3)) = 1
    x[1, ...] = 1e-42
    x[2, 0] = math.nan
    q = quantize(x.to(device), name, generator=torch.Generator(device).manual_seed(0))
    codes = q.scales.reshape(3, -1).cpu()
    assert (codes[0] == 127 + 1 - fmt.element.emax).all()
    assert (codes[1] == 0).all()
    assert codes[2, 0] == 255


@pytest.mark.parametrize("name", format_params(where=lambda f: not f.microscaling))
def test_deployed_storage_layout(name: str, device: torch.device) -> None:
    """uint8 codes (INT4 two per byte, low nibble first), one real-valued scale per group in its
    library's dtype (the input's, or fp32), int8 zero points for asymmetric formats."""
    fmt = get_format(name)
    x = data.normal((256, 256), seed=45).to(torch.bfloat16).to(device)
    q = quantize(x, name)
    groups = {"tensor": 1, "row": 256}.get(fmt.grouping, x.numel() // max(fmt.block_size, 1))
    assert q.codes.dtype == torch.uint8 and q.scales.numel() == groups
    assert q.scales.dtype == (torch.bfloat16 if fmt.scale.storage_dtype == "input" else torch.float32)
    assert q.codes.numel() == x.numel() // (2 if fmt.element.bits == 4 else 1)
    assert (q.zero_points is not None) == fmt.scale.asymmetric
    if q.zero_points is not None:
        assert q.zero_points.dtype == torch.int8 and q.zero_points.numel() == groups


@pytest.mark.parametrize("name", ALL)
def test_every_code_decodes_to_the_element_grid(name: str) -> None:
    elem = get_format(name).element
    codes = torch.arange(2**elem.bits, dtype=torch.uint8)
    if isinstance(elem, IntElement):  # integers: every code is a value, -qmin included
        assert sorted(set(decode_elements(codes, elem).abs().tolist())) == elem.grid()
        return
    values = decode(codes, elem)
    finite = values[values.abs() <= elem.max_value]
    assert sorted(set(finite.abs().tolist())) == elem.grid()
