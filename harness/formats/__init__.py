"""Block-scaled low-precision formats (OCP MX v1.0, NVFP4) as data, with exact fake and real
quantization.  ``fake_quantize(x, "mxfp4")`` is the entry point; see ``list_formats()``."""

from harness.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, INT8, ElementFormat
from harness.formats.quant import (
    SUPPORTED_DTYPES,
    QuantizedTensor,
    default_backend,
    dequantize,
    fake_quantize,
    nvfp4_per_tensor_scale,
    quantize,
    representable_max,
)
from harness.formats.registry import FORMATS, Format, get_format, list_formats
from harness.formats.scales import SCALE_MODES, ScaleCode, ScaleMode

__all__ = [
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "FORMATS",
    "INT8",
    "SCALE_MODES",
    "SUPPORTED_DTYPES",
    "ElementFormat",
    "Format",
    "QuantizedTensor",
    "ScaleCode",
    "ScaleMode",
    "default_backend",
    "dequantize",
    "fake_quantize",
    "get_format",
    "list_formats",
    "nvfp4_per_tensor_scale",
    "quantize",
    "representable_max",
]
