"""asv: speed and quality of fake_quantize per format (numpy/scipy ``benchmarks/`` layout).

``time_*``: fake_quantize of a fixed tensor, and ``clone`` of the same tensor (the memory-bound
reference: the history pages show both, and their ratio is the number that matters);
``track_*``: SQNR in dB of each format on fixed seeded data, so quality sits next to speed."""

import torch

from harness.formats import fake_quantize, list_formats
from harness.srdd.metrics import sqnr_db
from harness.testing import normal, student_t

FORMATS = list_formats()  # every registered format, so a new one reaches the history pages by itself
DATA = {"normal": normal, "student_t": student_t}  # the formats suite's generators, seed 0


class FakeQuantize4096:
    params = FORMATS
    param_names = ["format"]
    timeout = 300

    def setup(self, name):
        self.x = normal((4096, 4096))
        self.g = torch.Generator().manual_seed(0)

    def time_fake_quantize(self, name):
        fake_quantize(self.x, name, generator=self.g)


class Clone4096:
    """``clone`` of the same tensor: the memory-bound line every fake_quantize time is read against."""

    def setup(self):
        self.x = normal((4096, 4096))

    def time_clone(self):
        self.x.clone()


class Quality:
    params = (FORMATS, list(DATA))
    param_names = ["format", "data"]

    def track_sqnr_db(self, name, kind):
        x = DATA[kind]((1024, 1024))
        return float(sqnr_db(x, fake_quantize(x, name, generator=torch.Generator().manual_seed(0))))

    track_sqnr_db.unit = "dB"
