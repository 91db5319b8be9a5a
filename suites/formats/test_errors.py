"""Bad input gets a ValueError that names the bad value and the valid choices."""

from __future__ import annotations

import pytest
import torch

from harness.formats import fake_quantize, get_format, list_formats, quantize
from suites.formats import data


@pytest.mark.parametrize("fn", [fake_quantize, quantize], ids=["fake_quantize", "quantize"])
def test_unknown_format_lists_the_valid_ones(fn) -> None:
    with pytest.raises(ValueError, match=r"unknown format 'mxfp5'.*mxfp4, mxfp4_sr.*nvfp4"):
        fn(torch.ones(32), "mxfp5")
    with pytest.raises(ValueError, match="unknown format"):
        get_format(None)


@pytest.mark.mxfp4
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_unsupported_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"dtype {dtype} is not supported; valid dtypes: torch.float32"):
        fake_quantize(torch.ones(32).to(dtype), "mxfp4")


@pytest.mark.mxfp4
@pytest.mark.parametrize("axis", [2, -3, 7])
def test_axis_out_of_range(axis: int) -> None:
    with pytest.raises(ValueError, match=rf"axis {axis} is out of range for a 2-D tensor; valid axes: -2..1"):
        fake_quantize(torch.ones(4, 32), "mxfp4", axis=axis)


@pytest.mark.mxfp4_2d
def test_mxfp4_2d_needs_two_dims_and_no_axis() -> None:
    with pytest.raises(ValueError, match=r"mxfp4_2d .* at least 2 dims; got a 1-D tensor of shape \(64,\)"):
        fake_quantize(torch.ones(64), "mxfp4_2d")
    with pytest.raises(ValueError, match=r"axis=0 is not valid"):
        fake_quantize(torch.ones(64, 64), "mxfp4_2d", axis=0)


@pytest.mark.parametrize("name", [n for n in list_formats() if n != "nvfp4"])
def test_per_tensor_scale_only_where_the_format_has_one(name: str) -> None:
    expected = rf"per_tensor_scale is not used by {name}.*formats with a per-tensor scale: nvfp4"
    with pytest.raises(ValueError, match=expected):
        fake_quantize(torch.ones(4, 64), name, per_tensor_scale=1.0)


@pytest.mark.nvfp4
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), [1.0, 2.0]], ids=str)
def test_per_tensor_scale_must_be_one_positive_finite_number(bad) -> None:
    with pytest.raises(ValueError, match="per_tensor_scale must be one finite positive number"):
        fake_quantize(torch.ones(4, 64), "nvfp4", per_tensor_scale=bad)


def test_not_a_tensor() -> None:
    with pytest.raises(ValueError, match=r"expected a torch\.Tensor, got list"):
        fake_quantize([1.0, 2.0], "mxfp4")


@pytest.mark.mxfp4
def test_backend_names_and_where_the_fast_path_does_not_apply() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="unknown backend 'triton'; valid backends: auto, reference, fast"):
        fake_quantize(x, "mxfp4", backend="triton")
    with pytest.raises(ValueError, match=r"backend=.fast. cannot run mxfp4 here: no fast path for meta tensors"):
        fake_quantize(x.to("meta"), "mxfp4", backend="fast")


@pytest.mark.int8
def test_fast_real_quantization_of_a_real_valued_scale_format_is_refused_not_run_on_the_reference() -> None:
    """fake_quantize of INT8/FP8/INT4 has a C kernel; their quantize (codes + scales) has none, so
    backend='fast' says so instead of silently taking the reference path."""
    x = torch.randn(4, 64)
    assert torch.equal(fake_quantize(x, "int8_row", backend="fast"), fake_quantize(x, "int8_row", backend="reference"))
    with pytest.raises(ValueError, match=r"backend='fast' cannot run int8_row here: its real quantization \(codes"):
        quantize(x, "int8_row", backend="fast")
    assert quantize(x, "int8_row").format == "int8_row"  # auto: the reference path, as documented


@pytest.mark.mxfp4
@pytest.mark.nvfp4
@pytest.mark.parametrize("fn", [fake_quantize, quantize], ids=["fake_quantize", "quantize"])
def test_unknown_scale_mode_lists_the_valid_ones(fn) -> None:
    with pytest.raises(ValueError, match=r"unknown scale_mode 'round'; valid scale modes: floor, ceil, even, rceil"):
        fn(torch.ones(32), "mxfp4", scale_mode="round")
    with pytest.raises(ValueError, match=r"scale_mode 'ceil' applies to E8M0 \(MX\) scales only.*floor"):
        fn(torch.ones(32), "nvfp4", scale_mode="ceil")


@pytest.mark.gpu
@pytest.mark.mxfp4_sr
def test_a_cpu_generator_drives_cuda_tensors_like_cpu_ones(device: torch.device) -> None:
    """The failure of the 2026-11-26 GPU run (a CPU generator handed to CUDA tensors): the Philox
    key is drawn from the generator on its own device, so a CPU generator works on CUDA tensors and
    gives the very bits it gives on the CPU; a generator on the tensor's device works too."""
    x = data.normal((4, 64), seed=7)
    on_cpu = fake_quantize(x, "mxfp4_sr", generator=torch.Generator().manual_seed(0))
    on_device = fake_quantize(x.to(device), "mxfp4_sr", generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_device.cpu(), on_cpu)
    assert fake_quantize(x.to(device), "mxfp4_sr", generator=torch.Generator(device).manual_seed(0)).device == device
