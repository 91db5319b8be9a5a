"""SRDD detectors as streaming accumulators: ``update`` with tensor after tensor
(sums only, never the tensors), read the metric at the end.  The one-shot functions
(``sqnr_db(x, q)``, ...) are the same definitions applied to a single pair."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from harness.formats import get_format, representable_max


def clip_threshold(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per element of ``x``: the magnitude above which clipping changes the result, i.e. the
    block's largest representable value ``M·s`` plus half the element grid's top step ``Δ``:
    ``(M + Δ/2)·s``.  A value in ``(M·s, (M + Δ/2)·s]`` would round to ``M·s`` anyway (MXFP4:
    (6s, 7s] rounds to 6s), so clipping costs it nothing."""
    elem = get_format(fmt).element
    grid = elem.grid()
    return representable_max(x, fmt) * ((grid[-1] + (grid[-1] - grid[-2]) / 2) / grid[-1])


@dataclass
class QuantErrorStats:
    """Sums over every (reference x, quantized q) pair seen, in float64.

    - ``sqnr_db``: 10·log10(Σx² / Σ(x−q)²); +inf when q == x; NaN when x is all zero.
    - ``deadzone_ratio``: #(x≠0 ∧ q=0) / #(x≠0) — small values lost to zero.
    - ``saturation_ratio``: #(|x| > clip threshold) / #x — values whose clipping changes the
      result (needs ``clip_at`` from :func:`clip_threshold`); ``clip_share``: their share of the
      error energy, Σ_clipped (x−q)² / Σ (x−q)².
    - ``relative_error``: mean over x≠0 of |x−q| / |x|.
    - ``nonfinite``: #(x or q not finite); those elements are left out of every other sum, and a
      scan reports any as a finding of its own.
    """

    count: int = 0
    nonzero: int = 0
    dead: int = 0
    saturated: int = 0
    signal: float = 0.0
    noise: float = 0.0
    clip_noise: float = 0.0
    relative: float = 0.0
    nonfinite: int = 0

    def update(self, x: torch.Tensor, q: torch.Tensor, clip_at: torch.Tensor | None = None) -> QuantErrorStats:
        x, q = x.detach().float(), q.detach().float()
        finite = torch.isfinite(x) & torch.isfinite(q)
        self.nonfinite += int((~finite).sum())
        if not bool(finite.all()):
            x, q = x[finite], q[finite]
            clip_at = clip_at[finite] if clip_at is not None else None
        err = x - q
        nz = x != 0
        self.count += x.numel()
        self.nonzero += int(nz.sum())
        self.dead += int((nz & (q == 0)).sum())
        if clip_at is not None:
            clipped = x.abs() > clip_at
            self.saturated += int(clipped.sum())
            self.clip_noise += float(err[clipped].double().pow(2).sum())
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
    def clip_share(self) -> float:
        return self.clip_noise / self.noise if self.noise else 0.0

    @property
    def relative_error(self) -> float:
        return self.relative / self.nonzero if self.nonzero else math.nan

    @property
    def rms(self) -> float:
        """RMS of the reference values seen (the Gaussian floor is drawn at this RMS)."""
        return math.sqrt(self.signal / self.count) if self.count else math.nan

    def as_dict(self) -> dict[str, float]:
        return {
            "sqnr_db": self.sqnr_db,
            "deadzone_ratio": self.deadzone_ratio,
            "saturation_ratio": self.saturation_ratio,
            "clip_share": self.clip_share,
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
class Peak:
    """The massive activation: the largest |h| seen, with its token position and hidden dim."""

    value: float = 0.0
    position: int = -1
    dim: int = -1

    def update(self, h: torch.Tensor, positions: torch.Tensor) -> Peak:
        """``h``: (tokens, hidden) of real tokens; ``positions``: each row's position in its text."""
        a = h.detach().abs().float()
        if a.numel() == 0:
            return self
        flat = int(a.argmax())
        row, dim = divmod(flat, a.shape[-1])
        if a.numel() and float(a.view(-1)[flat]) > self.value:
            self.value, self.position, self.dim = float(a.view(-1)[flat]), int(positions[row]), dim
        return self


@dataclass
class OutputErrorStats:
    """Activation-aware weight error of one Linear: ``‖(W − Q(W))X‖ / ‖WX‖`` over the
    calibration inputs X (rows = real tokens), as sums of squares over batches."""

    error: float = 0.0
    output: float = 0.0

    def update(self, x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> OutputErrorStats:
        x, w = x.detach().double(), weight.detach().double()
        self.error += float((x @ (w - quantized.detach().double()).T).pow(2).sum())
        self.output += float((x @ w.T).pow(2).sum())
        return self

    @property
    def output_error(self) -> float:
        return math.sqrt(self.error / self.output) if self.output else math.nan


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


def saturation_ratio(x: torch.Tensor, clip_at: torch.Tensor) -> float:
    return QuantErrorStats().update(x, x, clip_at).saturation_ratio


def relative_error(x: torch.Tensor, q: torch.Tensor) -> float:
    return QuantErrorStats().update(x, q).relative_error


def kurtosis(x: torch.Tensor) -> float:
    return Moments().update(x).kurtosis


def instability(runs: torch.Tensor) -> float:
    return SpreadStats().update(runs).instability


def gain(f, h: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Residual-branch gain ``‖f(h+δ) − f(h) − δ‖ / ‖δ‖`` of a residual block ``f`` (output =
    h + branch(h)): how the branch, not the identity path, propagates a small probe δ.  Norms
    over the positions where ``keep`` is true (all when None); δ should be zero elsewhere."""
    with torch.no_grad():
        change = f(h + delta) - f(h) - delta
        if keep is not None:
            change, delta = change[keep], delta[keep]
        return float(change.double().norm() / delta.double().norm())
