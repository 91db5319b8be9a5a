"""asv: speed and quality of fake_quantize per format (numpy/scipy ``benchmarks/`` layout).

``time_*``: fake_quantize of a fixed tensor, and ``clone`` of the same tensor (the memory-bound
reference: the history pages show both, and their ratio is the number that matters);
``track_*``: SQNR in dB of each format on fixed seeded data, so quality sits next to speed."""

import torch

from harness.formats import fake_quantize
from harness.srdd.metrics import sqnr_db

FORMATS = ["mxfp4", "mxfp4_sr", "mxfp4_2d", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "nvfp4"]


def _data(kind: str, shape=(1024, 1024)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    # Student-t with 2 degrees of freedom: heavy tails like LLM activations
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, 2), generator=g).pow(2).sum(-1)
    return z / (chi2 / 2).sqrt()


class FakeQuantize4096:
    params = FORMATS
    param_names = ["format"]
    timeout = 300

    def setup(self, name):
        self.x = _data("normal", (4096, 4096))
        self.g = torch.Generator().manual_seed(0)

    def time_fake_quantize(self, name):
        fake_quantize(self.x, name, generator=self.g)


class Clone4096:
    """``clone`` of the same tensor: the memory-bound line every fake_quantize time is read against."""

    def setup(self):
        self.x = _data("normal", (4096, 4096))

    def time_clone(self):
        self.x.clone()


class Quality:
    params = (FORMATS, ["normal", "student_t"])
    param_names = ["format", "data"]

    def track_sqnr_db(self, name, kind):
        x = _data(kind)
        return float(sqnr_db(x, fake_quantize(x, name, generator=torch.Generator().manual_seed(0))))

    track_sqnr_db.unit = "dB"
