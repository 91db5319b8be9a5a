"""Counter-based random numbers for stochastic rounding: Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011; Random123's ``philox4x32_10``, which Triton's
``tl.philox`` also implements), so every path draws the same noise for the same element.

Element ``n`` of a flattened block tensor (padding included, block after block) gets output
word ``n % 4`` of Philox4x32-10 at counter ``(n // 4, 0, 0, 0)`` under the 64-bit key ``seed``,
turned into the uniform ``(word >> 8) * 2**-24`` in [0, 1) (24 bits, torch.rand's resolution).
The seed is one 63-bit draw from the ``torch.Generator`` given, so a generator state reproduces
the output on every path (reference tensor ops, C, Triton) and the next call draws new noise.
"""

from __future__ import annotations

import torch

ROUNDS = 10
M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
MASK32 = 0xFFFFFFFF


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 63-bit Philox key from ``generator`` (torch's default generator of ``device`` when
    None), advancing it, so successive calls with one generator draw independent noise."""
    where = generator.device if generator is not None else device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=where))


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit halves of ``a * b`` for uint32 values held in int64 (the 64-bit
    product wraps in two's complement, which leaves both halves' bits intact)."""
    p = b * a
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(counter: torch.Tensor, key: int) -> torch.Tensor:
    """Philox4x32-10 of ``counter`` (int64 holding uint32 words, shape ``(..., 4)``) under the
    64-bit ``key`` (word 0 = low half): the four output words, same shape."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def uniform(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """fp32 uniforms in [0, 1) of ``shape``: element ``n`` (row-major) from word ``n % 4`` at
    counter ``n // 4`` (see the module docstring)."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange((n + 3) // 4, device=device, dtype=torch.int64)
    zero = torch.zeros_like(index)
    counter = torch.stack((index & MASK32, index >> 32, zero, zero), dim=-1)
    words = philox4x32(counter, seed).reshape(-1)[:n]
    return ((words >> 8).to(torch.float32) * 2.0**-24).reshape(shape)
