"""Helpers for suites and benchmarks: format parameters with readable ids and format markers,
seeded test data (Normal, Student-t), bit-exact tensor comparison, the xdist device map."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
import torch

from harness.formats import get_format, list_formats


def format_marker(name: str) -> str:
    """The pytest marker of a format: its name without the element-type suffix, so the variants
    that differ only in their element type share one (``mxfp6_e2m3``, ``mxfp6_e3m2`` -> ``mxfp6``;
    ``mxfp4_sr`` and ``mxfp4_2d`` keep their own); the deployed formats with a real-valued scale
    share their element's (``fp8_e4m3_row`` -> ``fp8``, ``int4_g128_asym`` -> ``int4``). The
    plugin registers one per registry family."""
    fmt = get_format(name)
    if not fmt.microscaling:
        return fmt.name.split("_")[0]
    return re.sub(r"_e\d+m\d+$", "", fmt.name)


def format_marks(*names: str) -> list[pytest.MarkDecorator]:
    """The pytest markers of the named formats (``-m mxfp4`` selects every case carrying one)."""
    return [getattr(pytest.mark, m) for m in dict.fromkeys(format_marker(n) for n in names)]


def format_params(names: Iterable[str] | None = None, *, where=None) -> list:
    """One ``pytest.param`` per format, id = the format name, marked with its format marker.

    ``where`` filters registry entries (e.g. ``lambda f: not f.stochastic``).
    """
    chosen = list(names) if names is not None else list_formats()
    if where is not None:
        chosen = [n for n in chosen if where(get_format(n))]
    return [pytest.param(n, id=n, marks=format_marks(n)) for n in chosen]


def worker_device(worker_id: str, gpu: bool, device_count: int) -> torch.device:
    """The device of one pytest-xdist worker (xdist's ``PYTEST_XDIST_WORKER`` ids): ``gwN`` gets GPU ``N mod count``, so
    ``pytest -n <number of GPUs> --gpu`` runs one worker per GPU; without xdist (``master``) GPU 0;
    CPU runs stay on ``cpu``."""
    if not gpu:
        return torch.device("cpu")
    if device_count < 1:
        raise ValueError(f"--gpu needs at least one CUDA device, found {device_count}")
    index = int(worker_id[2:]) if worker_id.startswith("gw") and worker_id[2:].isdigit() else 0
    return torch.device("cuda", index % device_count)


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def normal(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """N(0, 1) data, seeded (fp32, CPU)."""
    return torch.randn(shape, generator=seeded(seed))


def student_t(shape: tuple[int, ...], seed: int = 0, df: int = 2) -> torch.Tensor:
    """Heavy-tailed data like LLM activations: Student-t with ``df`` degrees of freedom,
    ``z / sqrt(chi2_df / df)`` with ``chi2_df`` a sum of ``df`` squared normals, seeded."""
    g = seeded(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, df), generator=g).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (so -0.0 != +0.0 and NaN == NaN of the same payload), with the
    first mismatches shown."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    a = actual.contiguous().view(INT_VIEW[actual.dtype])
    e = expected.contiguous().view(INT_VIEW[expected.dtype])
    nan_both = torch.isnan(actual) & torch.isnan(expected)
    bad = (a != e) & ~nan_both
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        shown = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values differ, e.g. (index, got, want) {shown}"
        )
