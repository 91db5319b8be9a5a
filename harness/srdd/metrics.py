"""SRDD detectors (design §5) as streaming accumulators: ``update`` with tensor after tensor
(sums only, never the tensors), read the metric at the end.  The one-shot functions
(``sqnr_db(x, q)``, ...) are the same definitions applied to a single pair."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class QuantErrorStats:
    """Sums over every (reference x, quantized q) pair seen, in float64.

    - ``sqnr_db``: 10·log10(Σx² / Σ(x−q)²); +inf when q == x; NaN when x is all zero.
    - ``deadzone_ratio``: #(x≠0 ∧ q=0) / #(x≠0) — small values lost to zero.
    - ``saturation_ratio``: #(|x| > largest representable value of its block) / #x — values
      actually clipped (needs ``limit`` from ``harness.formats.representable_max``).
    - ``relative_error``: mean over x≠0 of |x−q| / |x|.
    """

    count: int = 0
    nonzero: int = 0
    dead: int = 0
    saturated: int = 0
    signal: float = 0.0
    noise: float = 0.0
    relative: float = 0.0

    def update(self, x: torch.Tensor, q: torch.Tensor, limit: torch.Tensor | None = None) -> QuantErrorStats:
        x, q = x.detach().float(), q.detach().float()
        err = x - q
        nz = x != 0
        self.count += x.numel()
        self.nonzero += int(nz.sum())
        self.dead += int((nz & (q == 0)).sum())
        if limit is not None:
            self.saturated += int((x.abs() > limit).sum())
        self.signal += float(x.double().pow(2).sum())
        self.noise += float(err.double().pow(2).sum())
        self.relative += float((err.abs()[nz] / x.abs()[nz]).double().sum())
        return self

    def merge(self, other: QuantErrorStats) -> QuantErrorStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def sqnr_db(self) -> float:
        if self.signal == 0:
            return math.nan
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)

    @property
    def deadzone_ratio(self) -> float:
        return self.dead / self.nonzero if self.nonzero else math.nan

    @property
    def saturation_ratio(self) -> float:
        return self.saturated / self.count if self.count else math.nan

    @property
    def relative_error(self) -> float:
        return self.relative / self.nonzero if self.nonzero else math.nan

    def as_dict(self) -> dict[str, float]:
        return {
            "sqnr_db": self.sqnr_db,
            "deadzone_ratio": self.deadzone_ratio,
            "saturation_ratio": self.saturation_ratio,
            "relative_error": self.relative_error,
        }


@dataclass
class Moments:
    """Raw power sums for the Pearson kurtosis E[(x−μ)⁴] / σ⁴ (non-excess: 3 for a Gaussian)."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    def update(self, x: torch.Tensor) -> Moments:
        x = x.detach().double().flatten()
        self.n += x.numel()
        x2 = x * x
        self.s1 += float(x.sum())
        self.s2 += float(x2.sum())
        self.s3 += float((x2 * x).sum())
        self.s4 += float((x2 * x2).sum())
        return self

    @property
    def kurtosis(self) -> float:
        if self.n == 0:
            return math.nan
        mu = self.s1 / self.n
        m2 = self.s2 / self.n - mu * mu
        m4 = self.s4 / self.n - 4 * mu * self.s3 / self.n + 6 * mu * mu * self.s2 / self.n - 3 * mu**4
        return m4 / (m2 * m2) if m2 > 0 else math.nan


@dataclass
class SpreadStats:
    """Instability: RMS over elements of the std across R runs, divided by the RMS of the output
    (``sqrt(Σ var_runs / Σ mean²)``); exactly 0 when every run gives the same bits."""

    variance: float = 0.0
    power: float = 0.0

    def update(self, runs: torch.Tensor) -> SpreadStats:
        """``runs``: shape (R, ...) — the same layer output from R stochastic runs."""
        runs = runs.detach().double()
        self.variance += float(runs.var(dim=0, unbiased=False).sum())
        self.power += float(runs.mean(dim=0).pow(2).sum())
        return self

    @property
    def instability(self) -> float:
        return math.sqrt(self.variance / self.power) if self.power else math.nan


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    return QuantErrorStats().update(x, q).sqnr_db


def deadzone_ratio(x: torch.Tensor, q: torch.Tensor) -> float:
    return QuantErrorStats().update(x, q).deadzone_ratio


def saturation_ratio(x: torch.Tensor, limit: torch.Tensor) -> float:
    return QuantErrorStats().update(x, x, limit).saturation_ratio


def relative_error(x: torch.Tensor, q: torch.Tensor) -> float:
    return QuantErrorStats().update(x, q).relative_error


def kurtosis(x: torch.Tensor) -> float:
    return Moments().update(x).kurtosis


def instability(runs: torch.Tensor) -> float:
    return SpreadStats().update(runs).instability


def gain(f, h: torch.Tensor, delta: torch.Tensor) -> float:
    """‖f(h+δ) − f(h)‖ / ‖δ‖: how a small probe δ at a layer's input propagates through it."""
    with torch.no_grad():
        return float((f(h + delta) - f(h)).double().norm() / delta.double().norm())
