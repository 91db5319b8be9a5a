"""Block Hadamard rotations along a Linear's input dimension (FP-Quant / MR-GPTQ's mitigation for
MXFP4: Egiazarian et al., "Bridging the Gap Between Promise and Performance for Microscaling FP4
Quantization", 2025; vLLM's ``FPQuantConfig(hadamard_group_size=32)``).

``H`` is the orthonormal Sylvester Hadamard matrix of size ``k`` (a power of two),
``H[i, j] = (-1)**popcount(i & j) / sqrt(k)``, optionally with seeded random signs on its rows
(``D H``, still orthonormal).  Applied block-diagonally along the input dim, ``R = diag(H, ..., H)``
satisfies ``R Rᵀ = I``, so ``(X R)(W R)ᵀ = X Wᵀ``: the unquantized Linear is unchanged.
Quantized: weight-only uses ``Q(W R) Rᵀ``, input-only ``Q(X R) Rᵀ``, both ``Q(X R) Q(W R)ᵀ``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from harness.vocab import Vocab


class Transform(Vocab, kind="transform"):
    """A rotation applied to weights and inputs before quantizing (``transform=``; None: none)."""

    HADAMARD = "hadamard"  # block Hadamard along the input dim (:class:`BlockRotation`)


TRANSFORMS = Transform.choices()


@functools.lru_cache(maxsize=64)
def hadamard_matrix(size: int, *, seed: int | None = None) -> torch.Tensor:
    """The orthonormal ``size x size`` Sylvester Hadamard matrix (fp32), rows multiplied by
    seeded random signs when ``seed`` is given."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard block size must be a power of two, got {size}")
    i = torch.arange(size)
    bits = (i[:, None] & i[None, :]).to(torch.int64)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    h = (1 - 2 * parity).to(torch.float32) / math.sqrt(size)
    if seed is not None:
        signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        h = signs.to(torch.float32)[:, None] * h
    return h.requires_grad_(False)


@dataclass(frozen=True)
class BlockRotation:
    """``x -> x R`` along the last dim with ``R = diag(H, ..., H)`` of block ``size``."""

    size: int
    seed: int | None = None

    def matrix(self, device: torch.device) -> torch.Tensor:
        return hadamard_matrix(self.size, seed=self.seed).to(device)

    def check(self, dim: int, name: str) -> None:
        if dim % self.size:
            raise ValueError(
                f"{name}: input dim {dim} is not a multiple of the Hadamard block size {self.size}; "
                "pass a block size that divides it (transform_size=)"
            )

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` in fp32 (same shape)."""
        h = self.matrix(x.device)
        return (x.float().unflatten(-1, (-1, self.size)) @ h).flatten(-2)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``y Rᵀ`` in fp32: the inverse of :meth:`rotate`."""
        h = self.matrix(y.device)
        return (y.float().unflatten(-1, (-1, self.size)) @ h.T).flatten(-2)


def check_transform(transform: str | None) -> Transform | None:
    """The :class:`Transform` ``transform`` (None: none); :class:`harness.vocab.UnknownName` naming
    the valid transforms otherwise."""
    return None if transform is None else Transform.parse(transform)
