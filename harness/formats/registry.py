"""The format registry: one frozen :class:`Format` entry per name (adding a format is one entry)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from harness.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, INT8, ElementFormat
from harness.formats.scales import E4M3Scale, E8M0Scale, ScaleFormat


@dataclass(frozen=True)
class Format:
    """A block-scaled low-precision format: element type, block shape, scale encoding.

    ``stochastic`` formats round with a ``torch.Generator``'s draws. ``scale.mode`` is the
    shared-exponent rule (:meth:`with_scale_mode`); fast paths check it,
    ``element.twos_complement`` and the block shape before taking a format.
    """

    name: str
    element: ElementFormat
    block_shape: tuple[int, ...]
    scale: ScaleFormat
    description: str
    stochastic: bool = False

    @property
    def block_size(self) -> int:
        return math.prod(self.block_shape)

    @property
    def bits_per_element(self) -> float:
        """Storage cost: element bits plus the block scale's bits shared over the block."""
        return self.element.bits + self.scale.bits / self.block_size

    def with_scale_mode(self, mode: str) -> Format:
        """This format under scale rule ``mode`` (``harness.formats.scales.SCALE_MODES``)."""
        return self if mode == self.scale.mode else replace(self, scale=self.scale.with_mode(mode))


_MX = E8M0Scale()
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("mxfp4", E2M1, (32,), _MX, "OCP MXFP4: E2M1 elements, 32-element blocks, E8M0 scale"),
        Format(
            "mxfp4_sr",
            E2M1,
            (32,),
            _MX,
            "MXFP4 with unbiased stochastic rounding driven by a torch.Generator",
            stochastic=True,
        ),
        Format("mxfp4_2d", E2M1, (32, 32), _MX, "MXFP4 with one E8M0 scale per 32x32 tile of the last two dims"),
        Format("mxfp6_e2m3", E2M3, (32,), _MX, "OCP MXFP6 E2M3, 32-element blocks, E8M0 scale"),
        Format("mxfp6_e3m2", E3M2, (32,), _MX, "OCP MXFP6 E3M2, 32-element blocks, E8M0 scale"),
        Format("mxfp8_e4m3", E4M3, (32,), _MX, "OCP MXFP8 E4M3, 32-element blocks, E8M0 scale"),
        Format("mxfp8_e5m2", E5M2, (32,), _MX, "OCP MXFP8 E5M2, 32-element blocks, E8M0 scale"),
        Format("mxint8", INT8, (32,), _MX, "OCP MXINT8: int8 elements k * 2**-6, 32-element blocks, E8M0"),
        Format(
            "nvfp4",
            E2M1,
            (16,),
            E4M3Scale(),
            "NVFP4: E2M1 elements, 16-element blocks, E4M3 scale (optional fp32 per-tensor scale)",
        ),
    )
}


def list_formats() -> list[str]:
    """Names of every registered format, in registry order."""
    return list(FORMATS)


def get_format(name: str) -> Format:
    """The registry entry for ``name``; ValueError naming the valid formats otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None
