"""QeRL's decaying-sigma schedule (Huang et al. 2025, ``trl_trainer/noise_scheduler.py``), made
safe: the configurations that silently break it are rejected with the reason."""

from __future__ import annotations

from dataclasses import dataclass


class ScheduleError(ValueError):
    """An AQN schedule that would not do what its numbers suggest."""


@dataclass(frozen=True)
class SigmaSchedule:
    """``trend[k] = sigma_start * (sigma_end / sigma_start) ** (k / (num_stages - 2))`` for
    k = 0 … num_stages−2; the run is cut into ``num_stages`` equal intervals (QeRL:
    ``interval = int(min(step, total) // (total / num_stages))``); interval 0 is warm-up (σ = 0)
    and interval i ≥ 1 uses ``trend[min(i − 1, num_stages − 2)]``."""

    sigma_start: float
    sigma_end: float
    num_stages: int
    total_steps: int

    def __post_init__(self) -> None:
        if not self.sigma_start > 0:
            raise ScheduleError(
                f"sigma_start must be > 0, got {self.sigma_start}: with it the schedule injects no noise"
            )
        if not self.sigma_end > 0:
            raise ScheduleError(
                f"sigma_end must be > 0, got {self.sigma_end}: QeRL's formula turns sigma_end=0 into "
                f"[{self.sigma_start}, 0, 0, ...] — noise in one interval and none after "
                "('broken AQN'); use a small positive value such as sigma_start / 100"
            )
        if self.sigma_end > self.sigma_start:
            raise ScheduleError(f"sigma_end {self.sigma_end} > sigma_start {self.sigma_start}: the schedule must decay")
        if self.num_stages < 3:
            raise ScheduleError(
                f"num_stages must be >= 3, got {self.num_stages}: one warm-up interval plus a trend of at least "
                "two values (the exponent divides by num_stages - 2)"
            )
        if self.total_steps < self.num_stages:
            raise ScheduleError(
                f"total_steps {self.total_steps} < num_stages {self.num_stages}: some intervals would have no step"
            )

    @property
    def trend(self) -> list[float]:
        ratio = self.sigma_end / self.sigma_start
        return [self.sigma_start * ratio ** (k / (self.num_stages - 2)) for k in range(self.num_stages - 1)]

    def interval(self, step: int) -> int:
        return int(min(step, self.total_steps) // (self.total_steps / self.num_stages))

    def sigma_at(self, step: int) -> float:
        i = self.interval(step)
        return 0.0 if i == 0 else self.trend[min(i - 1, self.num_stages - 2)]

    def values(self) -> list[float]:
        """sigma at every step 0 … total_steps − 1."""
        return [self.sigma_at(s) for s in range(self.total_steps)]
