"""The format's own floor for a tensor: the detectors on a seeded i.i.d. Gaussian
tensor of the same shape and RMS, quantized the same way (a tensor of fewer than
``FLOOR_MIN_ELEMENTS`` gets the rates of more rows of the same length, scaled to its size: one
seeded 512-value tensor estimates MXFP8's rare-clipping error too noisily to judge against).
A weight is problematic only when it is worse than that floor, never because the format is
coarse: MXFP4 on Gaussian data already has SQNR 18.8 dB, deadzone 8.8 %, relative error 21 %.

``excess`` turns a metric and its floor into one number, the factor by which the tensor's error
exceeds the floor's (> 1: worse than a Gaussian tensor would be): error energy for SQNR
(10^((floor − sqnr)/10)), the ratio itself for deadzone, saturation and relative error.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from harness.formats import fake_quantize
from harness.srdd.metrics import QuantErrorStats, clip_threshold

FLOOR_SEED = 0
FLOOR_METRICS = ("sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error")


FLOOR_MIN_ELEMENTS = 8192  # a smaller tensor's floor is estimated on more rows of the same length


@functools.lru_cache(maxsize=1024)
def _floor(fmt: str, shape: tuple[int, ...], rms: float) -> QuantErrorStats:
    cols = shape[-1] if shape else 1
    numel = math.prod(shape)
    rows = max(math.ceil(FLOOR_MIN_ELEMENTS / cols), numel // cols)
    z = torch.randn((rows, cols), generator=torch.Generator().manual_seed(FLOOR_SEED)) * rms
    q = fake_quantize(z, fmt, generator=torch.Generator().manual_seed(FLOOR_SEED))
    stats = QuantErrorStats().update(z, q, clip_threshold(z, fmt))
    if rows * cols == numel:
        return stats
    scale = numel / (rows * cols)  # the sums of a tensor of ``shape`` at the rates of the larger sample
    return QuantErrorStats(**{k: v * scale for k, v in dataclasses.asdict(stats).items()})


def gaussian_floor(fmt: str, shape: tuple[int, ...], rms: float) -> QuantErrorStats:
    """The detectors' sums for ``N(0, rms²)`` i.i.d. of ``shape`` under ``fmt`` (seeded; cached per
    format, shape and RMS; a fresh copy each call, so callers may merge into it)."""
    return dataclasses.replace(_floor(fmt, tuple(shape), float(rms)))


def excess(metric: str, value: float, floor: float) -> float:
    """Factor by which ``value`` is worse than ``floor`` (1 = on the floor, > 1 worse)."""
    if math.isnan(value) or math.isnan(floor):
        return math.nan
    if metric == "sqnr_db":
        return 10 ** ((floor - value) / 10) if math.isfinite(floor) else (math.inf if math.isfinite(value) else 1.0)
    if floor == 0:
        return 1.0 if value == 0 else math.inf
    return value / floor
