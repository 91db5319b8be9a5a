"""An independent scalar reference of the format semantics (OCP MX v1.0; NVFP4 as
torchao's ``NVFP4Tensor``), in plain Python.

Python floats are IEEE doubles, every fp32 input is exact in them, scaling by powers of two is
exact, and ``round()`` on a float rounds half to even, so this follows the OCP MX v1.0 text
literally; NVFP4's fp32 steps (amax/6, the reciprocal, the product) are done in numpy.float32.
It shares no code with ``harness.formats``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.formats import Format

E4M3_MIN_NORMAL, E4M3_MAX = 2.0**-6, 448.0


def _round_to_grid(v: float, mbits: int, emin: int, max_value: float) -> float:
    a = abs(v)
    e = emin if a < 2.0**emin else max(math.frexp(a)[1] - 1, emin)
    step = 2.0 ** (e - mbits)
    return math.copysign(min(round(a / step) * step, max_value), v)


def _elem(fmt: Format) -> tuple[int, int, float]:
    el = fmt.element
    return el.mbits, 1 - el.bias, el.max_value


def mx_block(values: list[float], fmt: Format) -> list[float]:
    """One MX block: ``scale = 2**clamp(floor(log2(amax)) - emax_elem, -127, 127)``."""
    if not all(math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    mbits, emin, max_value = _elem(fmt)
    emax_elem = math.floor(math.log2(max_value))  # exact here: max values are small rationals
    amax = max(abs(v) for v in values)
    floor_log2 = math.frexp(amax)[1] - 1 if amax > 0 else -1000
    scale = 2.0 ** min(max(floor_log2 - emax_elem, -127), 127)
    out = [_round_to_grid(v / scale, mbits, emin, max_value) * scale for v in values]
    # Integer elements (MXINT8) are two's complement: no -0, so a zero is +0.
    return [v + 0.0 for v in out] if fmt.element.twos_complement else out


def nvfp4_block(values: list[float], fmt: Format, per_tensor_scale: float | None) -> list[float]:
    """One NVFP4 block in torchao's convention, fp32 arithmetic where torchao does fp32."""
    if not all(math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    f32 = np.float32
    mbits, emin, max_value = _elem(fmt)
    raw = f32(max(abs(v) for v in values)) / f32(max_value)
    if per_tensor_scale is not None:
        raw = raw / f32(per_tensor_scale)
    s = f32(_round_to_grid(float(min(max(raw, f32(E4M3_MIN_NORMAL)), f32(E4M3_MAX))), 3, -6, E4M3_MAX))
    if per_tensor_scale is None:
        recip, dq = f32(1.0) / s, s
    else:
        recip, dq = (f32(1.0) / f32(per_tensor_scale)) / s, f32(per_tensor_scale) * s
    return [float(f32(_round_to_grid(float(f32(v) * recip), mbits, emin, max_value)) * dq) for v in values]


def reference_fake_quantize(x: torch.Tensor, fmt: Format, per_tensor_scale: float | None = None) -> torch.Tensor:
    """Scalar reference of ``fake_quantize(x, fmt.name)``: blocks along the last dim, or tiles."""
    if len(fmt.block_shape) == 2:
        tile, mats = fmt.block_shape, x.float().reshape(-1, *x.shape[-2:])
    else:
        tile, mats = (1, fmt.block_shape[0]), x.float().reshape(1, -1, x.shape[-1])
    out = torch.empty(mats.shape, dtype=torch.float64)
    for m, mat in enumerate(mats.tolist()):
        n_r, n_c = len(mat), len(mat[0])
        for r0 in range(0, n_r, tile[0]):
            for c0 in range(0, n_c, tile[1]):
                cells = [(r, c) for r in range(r0, min(r0 + tile[0], n_r)) for c in range(c0, min(c0 + tile[1], n_c))]
                values = [mat[r][c] for r, c in cells]
                if fmt.scale.name == "e4m3":
                    result = nvfp4_block(values, fmt, per_tensor_scale)
                else:
                    result = mx_block(values, fmt)
                for (r, c), v in zip(cells, result):
                    out[m, r, c] = v
    return out.to(torch.float32).reshape(x.shape).to(x.dtype)
