"""Seeded ``torch.Generator``s on the device of the tensors they drive.

A CPU generator cannot drive CUDA draws (``Expected a 'cuda' device type for generator``), and a
model may span devices, so a seed becomes one generator per device, made on first use. On the CPU
this is exactly ``torch.Generator().manual_seed(seed)``: CPU results do not change.
"""

from __future__ import annotations

import torch


class DeviceGenerators:
    """``gens(device)`` is the generator for ``device``, seeded with ``seed`` when first asked for."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device not in self._by_device:
            self._by_device[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._by_device[device]
