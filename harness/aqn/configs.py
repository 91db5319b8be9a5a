"""Named AQN configurations (a registry of frozen entries) from QeRL and the experiment's notes."""

from __future__ import annotations

from dataclasses import dataclass

from harness.aqn.schedule import SigmaSchedule


@dataclass(frozen=True)
class AQNConfig:
    name: str
    sigma_start: float
    sigma_end: float
    num_stages: int
    layer_types: tuple[str, ...]
    source: str
    scale: str = "absolute"

    def schedule(self, total_steps: int) -> SigmaSchedule:
        """The validated schedule (raises ScheduleError for a broken configuration)."""
        return SigmaSchedule(self.sigma_start, self.sigma_end, self.num_stages, total_steps)


CONFIGS: dict[str, AQNConfig] = {
    c.name: c
    for c in (
        AQNConfig("qerl-default", 0.05, 0.0005, 10, ("rmsnorm",), "QeRL default (experiment §14.3)"),
        AQNConfig("qerl-nvfp4", 0.01, 0.0001, 10, ("rmsnorm",), "QeRL's shipped NVFP4 training scripts"),
        AQNConfig("1A", 0.05, 0.0005, 10, ("linear",), "experiment 1A, §19.1-§20: collapsed at step 19"),
        AQNConfig("1B", 0.15, 0.0015, 10, ("linear",), "experiment 1B, §19.2: sigma scaled 3x"),
        AQNConfig("1C", 0.005, 0.00005, 10, ("linear",), "experiment 1C, §21: partial collapse"),
        AQNConfig("1D", 0.001, 0.00001, 10, ("linear",), "experiment 1D, §22"),
        AQNConfig("1E", 0.05, 0.0005, 10, ("rmsnorm",), "experiment 1E, §20.4/§22.2: back to RMSNorm"),
        AQNConfig("broken-sigma-end-0", 0.05, 0.0, 10, ("rmsnorm",), "the experiment's broken AQN, §14.2"),
    )
}


def get_config(name: str) -> AQNConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown AQN configuration {name!r}; valid: {', '.join(CONFIGS)}") from None
