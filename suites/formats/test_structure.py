"""Structural properties every format must have, checked on seeded data: grid membership,
scale structure, true 32x32 tiles, idempotence, odd symmetry, saturation, zero blocks, the
NaN/Inf rule, partial blocks, axes and dtypes.  The real-valued-scale formats (FP8 / INT8 / INT4
per row, group, tile, tensor) have their own versions where the property differs (their scale
is not a power of two, their library computes in the input dtype, amax/127.5 is not idempotent)."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import SCALE_MODES, dequantize, fake_quantize, get_format, quantize
from harness.formats.affine import decode_elements
from harness.formats.elements import E4M3
from harness.testing import assert_same_bits, format_params
from suites.formats import data

ALL = format_params()
MICRO = format_params(where=lambda f: f.microscaling)
DEPLOYED = format_params(where=lambda f: not f.microscaling)
DIVISOR_IS_MAX = format_params(where=lambda f: not f.microscaling and f.scale.divisor == f.element.max_value)
HALF_RANGE = format_params(where=lambda f: not f.microscaling and f.scale.divisor == f.element.max_value + 0.5)
BLOCKED = format_params(where=lambda f: not f.whole)  # a row or tensor scale has no partial blocks
DETERMINISTIC = format_params(where=lambda f: not f.stochastic and f.microscaling)
ONE_D = format_params(where=lambda f: len(f.block_shape) == 1)


def group_mask(name: str, shape: tuple[int, int], r: int, c: int) -> torch.Tensor:
    """Which elements of a (rows, cols) tensor share element (r, c)'s scale."""
    fmt = get_format(name)
    mask = torch.zeros(shape, dtype=torch.bool)
    if fmt.grouping == "tensor":
        mask[:] = True
    elif fmt.grouping == "row":
        mask[r] = True
    else:
        rows, cols = fmt.block_shape if fmt.grouping == "tile" else (1, fmt.block_size)
        r0, c0 = r // rows * rows, c // cols * cols
        mask[r0 : r0 + rows, c0 : c0 + cols] = True
    return mask


def fq(x: torch.Tensor, name: str, device: torch.device, **kw) -> torch.Tensor:
    """fake_quantize of ``x`` on ``device`` (the suite's: CUDA under ``--gpu``), back on the CPU,
    with a fixed generator on that device, so stochastic formats are reproducible here."""
    return fake_quantize(x.to(device), name, generator=torch.Generator(device).manual_seed(123), **kw).cpu()


def block_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """(nblocks, block_numel) view of a (rows, cols) tensor whose dims are whole blocks."""
    shape = get_format(name).block_shape
    if len(shape) == 1:
        return x.reshape(-1, shape[0])
    r, c = x.shape
    return x.reshape(r // 32, 32, c // 32, 32).transpose(1, 2).reshape(-1, 1024)


def expected_scale(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Each block's scale straight from the spec formulas (OCP MX v1.0, torchao's NVFP4)."""
    fmt = get_format(name)
    amax = blocks.abs().amax(-1, keepdim=True)
    if fmt.scale.name == "e8m0":
        exponent = torch.frexp(amax).exponent - 1 - fmt.element.emax
        return torch.exp2(exponent.clamp(-127, 127).double()).float()
    return (amax / 6.0).clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("name", MICRO)
def test_every_output_is_a_grid_point_times_its_block_scale(name: str, device: torch.device) -> None:
    x = data.student_t((64, 256), seed=20)
    blocks, out = block_view(x, name), block_view(fq(x, name, device), name)
    scale = expected_scale(blocks, name)
    grid = torch.tensor(get_format(name).element.grid())
    ratio = (out / scale).abs()
    assert torch.isin(ratio, grid).all(), ratio[~torch.isin(ratio, grid)][:5]


@pytest.mark.parametrize("name", format_params(where=lambda f: f.scale.name == "e8m0"))
def test_mx_scales_are_powers_of_two(name: str, device: torch.device) -> None:
    x = data.normal((32, 128), seed=21) * 10.0 ** torch.linspace(-20, 20, 32).unsqueeze(1)
    scale = expected_scale(block_view(x, name), name)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()


@pytest.mark.nvfp4
def test_nvfp4_scales_are_e4m3_values(device: torch.device) -> None:
    x = data.normal((32, 128), seed=22) * 10.0 ** torch.linspace(-3, 3, 32).unsqueeze(1)
    scale = expected_scale(block_view(x, "nvfp4"), "nvfp4")
    assert torch.isin(scale, torch.tensor(E4M3.grid())).all()
    out = block_view(fq(x, "nvfp4", device), "nvfp4")
    assert torch.isin((out / scale).abs(), torch.tensor(get_format("nvfp4").element.grid())).all()


@pytest.mark.mxfp4_2d
def test_mxfp4_2d_has_one_scale_per_true_32x32_tile(device: torch.device) -> None:
    """A huge value at (0, 0) changes the scale of its 32x32 tile only: row 31 of that tile is
    affected, while row 0 of the next tile (columns 32..63) is not.  A "2D" mode that is
    really 1024 consecutive flattened elements gets both of these wrong."""
    x = data.normal((64, 64), seed=23)
    big = x.clone()
    big[0, 0] = 1e4
    before, after = fq(x, "mxfp4_2d", device), fq(big, "mxfp4_2d", device)
    changed = before != after
    assert changed[1:32, :32].any() and changed[31, :32].any()
    assert not changed[:, 32:].any() and not changed[32:, :].any()
    scales = expected_scale(block_view(x, "mxfp4_2d"), "mxfp4_2d")
    assert scales.numel() == 4


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_idempotent(name: str, device: torch.device) -> None:
    once = fq(data.student_t((32, 256), seed=24), name, device)
    assert_same_bits(fq(once, name, device), once, name)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_odd_symmetry(name: str, device: torch.device) -> None:
    x = data.exact_ties(get_format(name), (64, 64), seed=25)
    expected = -fq(x, name, device)
    if get_format(name).element.twos_complement:
        expected = expected + 0.0  # no -0 in two's complement: -(+0) stays +0
    assert_same_bits(fq(-x, name, device), expected, name)


@pytest.mark.parametrize("name", MICRO)
def test_saturates_to_the_element_max_never_inf(name: str, device: torch.device) -> None:
    """Values above the block's largest representable value clip to it: for MX an amax of
    2**(emax+1) - ulp maps to max_value * 2**0; near fp32 max the output stays finite."""
    fmt = get_format(name)
    top = torch.nextafter(torch.tensor(2.0 ** (fmt.element.emax + 1)), torch.tensor(0.0))  # fp32 ulp below
    just_below = torch.full((2, 64), 0.5)
    just_below[:, 0] = top
    huge = torch.full((2, 64), 3.4e38)  # / 2**127 = 1.998: above every element max's significand
    out_below, out_huge = fq(just_below, name, device), fq(huge, name, device)
    assert torch.isfinite(out_huge).all()
    if fmt.scale.name == "e8m0":
        assert out_below[0, 0].item() == fmt.element.max_value
        assert out_huge.max().item() == fmt.element.max_value * 2.0 ** (127 - fmt.element.emax)
    else:  # nvfp4 without a per-tensor scale: the E4M3 scale saturates at 448
        assert out_huge.max().item() == fmt.element.max_value * 448.0


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_stay_zero_beside_nonzero_blocks(name: str, device: torch.device) -> None:
    x = data.normal((64, 64), seed=26)
    x[:32, :32] = 0.0
    out = fq(x, name, device)
    assert_same_bits(out[:32, :32], torch.zeros(32, 32))
    assert (out[32:] != 0).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_poisons_exactly_its_block(name: str, bad: float, device: torch.device) -> None:
    x = data.normal((64, 64), seed=27)
    poisoned = x.clone()
    poisoned[40, 37] = bad
    clean, out = fq(x, name, device), fq(poisoned, name, device)
    in_block = group_mask(name, tuple(x.shape), 40, 37)
    assert torch.isnan(out[in_block]).all()
    assert_same_bits(out[~in_block], clean[~in_block], "blocks without the non-finite value")


@pytest.mark.parametrize("shape", [(3, 45), (5, 1), (2, 7, 33), (70, 45)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", BLOCKED)
def test_partial_blocks_are_zero_padded(name: str, shape: tuple[int, ...], device: torch.device) -> None:
    fmt = get_format(name)
    if fmt.grouping == "tile" and len(shape) < 2:
        pytest.skip("2-D tiles need 2 dims")
    x = data.normal(shape, seed=28)
    pad_r = (-shape[-2]) % fmt.block_shape[0] if fmt.grouping == "tile" else 0
    padded = torch.nn.functional.pad(x, (0, (-shape[-1]) % fmt.block_shape[-1], 0, pad_r))
    expected = fq(padded, name, device)[..., : shape[-2], : shape[-1]]
    if get_format(name).stochastic:  # the draws depend on the padded layout: compare the pattern only
        assert fq(x, name, device).shape == x.shape
        return
    assert_same_bits(fq(x, name, device), expected.contiguous(), name)


@pytest.mark.parametrize("name", ONE_D)
def test_blocks_along_another_axis(name: str, device: torch.device) -> None:
    x = data.normal((96, 40, 3), seed=29)
    moved = fq(x.movedim(0, -1).contiguous(), name, device).movedim(-1, 0).contiguous()
    assert_same_bits(fq(x, name, device, axis=0), moved)
    assert_same_bits(fq(x, name, device, axis=1), fq(x, name, device, axis=-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", MICRO)
def test_every_dtype_is_computed_in_fp32_and_returned_in_kind(
    name: str, dtype: torch.dtype, device: torch.device
) -> None:
    x = data.normal((16, 64), seed=30).to(dtype)
    out = fq(x, name, device)
    assert out.dtype == dtype and out.shape == x.shape
    assert_same_bits(out, fq(x.float(), name, device).to(dtype))


@pytest.mark.parametrize("name", ALL)
def test_input_is_never_modified_and_strides_do_not_matter(name: str, device: torch.device) -> None:
    base = data.normal((64, 64), seed=31).to(device)
    x = base.t()  # non-contiguous, on the device fq computes on (so the check is of that tensor)
    snapshot = x.clone()
    out = fq(x, name, device)
    assert_same_bits(x.cpu(), snapshot.cpu())
    assert_same_bits(out, fq(x.contiguous(), name, device))


@pytest.mark.parametrize("name", ONE_D)
def test_scalars_and_empty_tensors(name: str, device: torch.device) -> None:
    assert fq(torch.empty(0, 32), name, device).shape == (0, 32)
    assert fq(torch.tensor(3.3), name, device).shape == ()
    assert fq(torch.tensor(3.3), name, device).item() == fq(torch.tensor([3.3]), name, device).item()


def deployed_parts(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element of a 2-D ``x``: its element code value, its group's scale and zero point, from
    :func:`quantize` (the grid and scale structure checked below against the output)."""
    fmt = get_format(name)
    q = quantize(x, name)
    codes = q.codes
    if fmt.element.bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    values = q.layout.merge(decode_elements(codes, fmt.element)).reshape(x.shape)
    zp = torch.zeros_like(q.scales) if q.zero_points is None else q.zero_points
    scale, zp = (q.layout.merge(t.unsqueeze(-1).expand(q.layout.blocks_shape)).reshape(x.shape) for t in (q.scales, zp))
    return values, scale, zp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", DEPLOYED)
def test_deployed_outputs_are_codes_times_their_group_scale(name: str, dtype: torch.dtype) -> None:
    """``out == (code - zp) * scale`` with codes on the element grid (integers in [qmin, qmax],
    E4M3 values within +-448), one scale per group, and every group's max reaching at least
    ``qmax - 1`` codes (the scale is ``amax / divisor``, divisor >= qmax)."""
    fmt = get_format(name)
    x = data.student_t((256, 256), seed=20).to(dtype)
    values, scale, zp = deployed_parts(x, name)
    out = fake_quantize(x, name)
    assert torch.equal(((values - zp.float()).to(scale.dtype) * scale).to(dtype), out)
    grid = torch.tensor(fmt.element.grid())
    assert torch.isin(values.abs(), grid).all()
    if hasattr(fmt.element, "qmin"):
        assert values.min() >= fmt.element.qmin and values.max() <= fmt.element.qmax
    top = (values - zp.float()).abs().amax()
    assert top >= fmt.element.max_value - 1


@pytest.mark.parametrize("name", DIVISOR_IS_MAX)
def test_deployed_idempotent_where_the_divisor_is_the_element_max(name: str) -> None:
    """Scale ``amax / qmax``: the quantized group's max is ``qmax * scale`` again, so a second
    pass changes nothing.  (amax / 127.5 and amax / 7.5 are not idempotent: the group max
    becomes ``127 * scale`` or ``7 * scale`` and the next scale is smaller.)"""
    once = fake_quantize(data.student_t((64, 256), seed=24), name)
    assert_same_bits(fake_quantize(once, name), once, name)


@pytest.mark.parametrize("name", DIVISOR_IS_MAX)
def test_deployed_symmetric_formats_are_odd(name: str) -> None:
    """Scale ``amax / qmax``: ``f(-x) == -f(x)`` in value (zeros are +0 where the library adds a zero point)."""
    x = data.student_t((64, 256), seed=25)
    assert torch.equal(fake_quantize(-x, name), -fake_quantize(x, name))


@pytest.mark.parametrize("name", HALF_RANGE)
def test_half_range_divisor_maps_the_group_max_to_qmax_or_qmin_by_its_sign(name: str) -> None:
    """Scale ``amax / (qmax + 0.5)`` on ``[qmin, qmax] = [-qmax - 1, qmax]`` (torchao,
    compressed-tensors): ``amax / scale = qmax + 0.5`` exactly, a tie: a positive max clamps to
    ``qmax``, a negative one rounds half to even onto ``qmin``; so these formats are not odd."""
    fmt = get_format(name)
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1] = fmt.scale.divisor, -fmt.scale.divisor  # scale 1, exactly
    values, scale, _ = deployed_parts(x, name)
    assert values[0, 0] == fmt.element.qmax and values[0, 1] == fmt.element.qmin
    assert scale[0, 0] == 1.0


@pytest.mark.parametrize("name", DEPLOYED)
def test_deployed_saturates_huge_finite_input_to_finite_output(name: str) -> None:
    """Near the fp32 and bf16 maxima the scale stays finite and so does every output."""
    for dtype in (torch.float32, torch.bfloat16):
        x = (data.normal((8, 256), seed=32) * 1.7e38).clamp(-3.3e38, 3.3e38).to(dtype)
        x[:, 0] = 3.3e38
        assert torch.isfinite(fake_quantize(x, name)).all(), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", format_params(where=lambda f: f.scale.name == "e8m0"))
def test_every_scale_mode_saturates_finite_input_near_the_dtype_max(name: str, dtype: torch.dtype, device) -> None:
    """ceil, even and rceil pick a scale up to one binade above floor's: near the dtype's max the
    top codes times that scale overflow.  They saturate instead (the largest grid value whose
    product is finite), on the fast path and the reference path, quantize() included; blocks away
    from the max keep torchao's bits (test_torchao_parity.py)."""
    top = torch.finfo(dtype).max
    x = (data.normal((4, 64), seed=33) * top / 3).clamp(-top, top).to(dtype)
    x[:, ::32] = top
    for mode in SCALE_MODES:
        out = fq(x, name, device, scale_mode=mode)
        assert torch.isfinite(out).all(), f"{name}/{mode}/{dtype}: {out[~torch.isfinite(out)][:4]}"
        g = torch.Generator(device).manual_seed(123)
        assert_same_bits(dequantize(quantize(x.to(device), name, scale_mode=mode, generator=g)).cpu(), out)
