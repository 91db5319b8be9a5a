"""Named AQN configurations (a registry of frozen entries): QeRL's defaults (Huang et al. 2025,
``trl_trainer/noise_scheduler.py`` and its NVFP4 training scripts) and the sigma/target variants
1A-1E of the manual Qwen2.5-1.5B experiment the harness grew out of."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.aqn.schedule import SigmaSchedule
from harness.vocab import Registry


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


CONFIGS: Registry[AQNConfig] = Registry(
    "AQN configuration",
    (
        AQNConfig("qerl-default", 0.05, 0.0005, 10, ("rmsnorm",), "QeRL's default (noise_scheduler.py)"),
        AQNConfig("qerl-nvfp4", 0.01, 0.0001, 10, ("rmsnorm",), "QeRL's shipped NVFP4 training scripts"),
        AQNConfig("1A", 0.05, 0.0005, 10, ("linear",), "Qwen2.5-1.5B run 1A: Linear noise, collapsed at step 19"),
        AQNConfig("1B", 0.15, 0.0015, 10, ("linear",), "Qwen2.5-1.5B run 1B: 1A with sigma scaled 3x"),
        AQNConfig("1C", 0.005, 0.00005, 10, ("linear",), "Qwen2.5-1.5B run 1C: 1A with sigma / 10, partial collapse"),
        AQNConfig("1D", 0.001, 0.00001, 10, ("linear",), "Qwen2.5-1.5B run 1D: 1A with sigma / 50"),
        AQNConfig("1E", 0.05, 0.0005, 10, ("rmsnorm",), "Qwen2.5-1.5B run 1E: QeRL's sigma back on RMSNorm"),
        AQNConfig("broken-sigma-end-0", 0.05, 0.0, 10, ("rmsnorm",), "broken AQN: sigma_end 0 gives [sigma, 0, ...]"),
    ),
)


def get_config(name: str) -> AQNConfig:
    """The configuration ``name``; :class:`harness.vocab.UnknownName` naming the valid ones otherwise."""
    return CONFIGS.get(name)


def load_config(spec: str) -> AQNConfig:
    """A named configuration (:data:`CONFIGS`), or a JSON file (a name ending in ``.json``) with
    ``sigma_start``, ``sigma_end``, ``num_stages`` and optionally ``name`` (default: the file's
    stem), ``layer_types`` (default ``["rmsnorm"]``) and ``scale`` (default ``absolute``).  A file
    that cannot be read or lacks a key is a ValueError naming it and the keys it needs."""
    if not spec.endswith(".json"):
        return get_config(spec)
    path = Path(spec)
    try:
        raw = json.loads(path.read_text())
        return AQNConfig(
            name=raw.get("name", path.stem),
            sigma_start=float(raw["sigma_start"]),
            sigma_end=float(raw["sigma_end"]),
            num_stages=int(raw["num_stages"]),
            layer_types=tuple(raw.get("layer_types", ["rmsnorm"])),
            source=spec,
            scale=raw.get("scale", AQNConfig.scale),
        )
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{spec}: not a valid AQN config JSON ({err!r}); needs sigma_start, sigma_end, num_stages "
            "and optionally name, layer_types, scale"
        ) from err
