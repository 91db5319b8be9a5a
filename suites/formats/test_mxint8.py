"""MXINT8 (OCP MX v1.0 §5.4) against microsoft/microxcaling's int8 element rule, re-derived
here in numpy float64 (nothing copied): per block of 32, ``e = floor(log2(amax))`` (its
``emax`` for int8 is 0) clamped to >= -127; elements ``x / 2**e`` scaled by ``2**(bits - 2) =
64``, rounded half to even (its ``round="even"``), scaled back and clamped to ``±127/64``
(``max_norm = (2**7 - 1) / 2**6``, symmetric: -128 is never produced); output times ``2**e``.

Two documented differences: microxcaling takes ``floor(log2)`` with a float ``log2`` (off by
one just below a power of two, which the exact rule here and in the harness avoids), and it
returns -0.0 for small negatives, where two's-complement codes can only mean +0; values are
compared with ``==`` (-0.0 == +0.0) and the zeros' signs separately."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.formats import dequantize, fake_quantize, get_format, quantize
from harness.testing import format_params
from suites.formats import data

MXINT8 = format_params(["mxint8"])


def microxcaling_int8_rule(x: torch.Tensor) -> torch.Tensor:
    """The rule above on fp32 ``x`` whose last dim is a multiple of 32 (finite values)."""
    blocks = x.double().numpy().reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    _, exp = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = m * 2**exp, m in [0.5, 1)
    e = np.maximum(np.where(amax > 0, exp - 1, -126), -127).astype(np.float64)
    k = np.clip(np.rint(blocks / 2.0**e * 64.0), -127, 127)  # rint: round half to even
    return torch.from_numpy((k / 64.0 * 2.0**e).reshape(x.shape)).float()


DATA = {
    "normal": lambda: data.normal((64, 256), seed=60),
    "student_t": lambda: data.student_t((64, 256), seed=61),
    "ties": lambda: data.exact_ties(get_format("mxint8"), (64, 256), seed=62),
    "tiny_and_huge": lambda: data.normal((64, 256), seed=63) * 2.0 ** torch.randint(-120, 120, (64, 1)).float(),
}


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("name", MXINT8)
def test_matches_the_microxcaling_rule(name: str, kind: str, device: torch.device) -> None:
    x = DATA[kind]()
    got = fake_quantize(x.to(device), name).cpu()
    want = microxcaling_int8_rule(x)
    assert torch.equal(got, want), f"{kind}: {int((got != want).sum())} values differ"
    assert not torch.signbit(got[got == 0]).any()  # two's complement: +0 only
    if kind == "ties":  # half-steps were present and rounded to even codes
        halves = (x.reshape(-1, 32) / x.reshape(-1, 32)[:, :1] * 64).frac().abs() == 0.5
        assert halves.any()
        k = (got.reshape(-1, 32) / x.reshape(-1, 32)[:, :1] * 64)[halves]
        assert (k.remainder(2) == 0).all()


@pytest.mark.parametrize("name", MXINT8)
def test_codes_are_twos_complement_int8(name: str, device: torch.device) -> None:
    """Codes are the signed integers k (as uint8 bytes) of k * 2**-6, |k| <= 127, one per
    byte; value = k * 2**-6 * 2**(scale code - 127)."""
    x = data.student_t((32, 128), seed=64).to(device)
    q = quantize(x, name)
    k = q.codes.view(torch.int8).to(torch.float32)
    assert q.codes.shape == (32, 4, 32) and k.abs().max().item() == 127
    assert (k < 0).any() and (k > 0).any()
    scale = torch.exp2(q.scales.to(torch.float32) - 127).unsqueeze(-1)
    assert torch.equal((k * 2.0**-6 * scale).reshape(x.shape), fake_quantize(x, name))
    assert torch.equal(dequantize(q), fake_quantize(x, name))
