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


def _rows(x: torch.Tensor, width: int) -> list[list[float]]:
    """``x`` (2-D) as fp32 Python floats, cut into groups of ``width`` along the last dim."""
    flat = x.float().tolist()
    return [row[c : c + width] for row in flat for c in range(0, len(row), width)]


def vllm_int8_row(x: torch.Tensor) -> torch.Tensor:
    """vLLM ``csrc/quantization/compressed_tensors/int8_quant_kernels.cu``,
    ``dynamic_scaled_int8_quant_kernel``: per token ``absmax`` in fp32, stored scale
    ``absmax / 127``, codes ``cvt.rni.sat.s8.f32(x * (127 / absmax))`` (round half to even,
    saturate to [-128, 127], NaN -> 0), dequantized ``code * scale`` in fp32."""
    f32 = np.float32
    out = []
    for group in _rows(x, x.shape[-1]):
        absmax = f32(max(abs(v) for v in group))
        scale = absmax / f32(127.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mult = f32(127.0) / absmax
            products = [f32(v) * mult for v in group]
        codes = [0.0 if math.isnan(p) else min(max(float(round(float(p))), -128.0), 127.0) for p in products]
        out.append([float(f32(c) * scale) for c in codes])
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape).to(x.dtype)


def vllm_fp8_group_ue8m0(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """vLLM ``vllm/model_executor/layers/quantization/utils/fp8_utils.py``,
    ``_per_token_group_quant_fp8`` with ``use_ue8m0=True`` (DeepGEMM's scale format):
    ``absmax = max(max |y|, eps = 1e-10)`` in fp32, ``scale = 2**ceil(log2(absmax / 448))``
    (computed exactly here; the kernel's ``tl.log2`` is a float approximation of the same rule),
    codes ``fp8_e4m3(clamp(y / scale, -448, 448))`` (round to nearest even), dequantized
    ``code * scale``."""
    f32 = np.float32
    out = []
    for values in _rows(x, group):
        absmax = max(f32(max(abs(v) for v in values)), f32(1e-10))
        raw = float(absmax / f32(448.0))
        mantissa, exponent = math.frexp(raw)  # raw = mantissa * 2**exponent, mantissa in [0.5, 1)
        scale = 2.0 ** (exponent - 1) if mantissa == 0.5 else 2.0**exponent
        scaled = [min(max(float(f32(v) / f32(scale)), -E4M3_MAX), E4M3_MAX) for v in values]
        codes = [_round_to_grid(v, 3, -6, E4M3_MAX) for v in scaled]
        out.append([c * scale for c in codes])
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape).to(x.dtype)


VLLM_REFERENCES = {"int8_row_vllm": vllm_int8_row, "fp8_e4m3_g128_ue8m0": vllm_fp8_group_ue8m0}
