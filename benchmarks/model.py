"""asv: the default model (SmolLM2-135M) end to end. ``time_weight_scan``: the SRDD weight scan
(all 210 Linear weights); ``track_answer_loss``: the answer-token loss on the first 32 GSM8K test
items with each format on the weights (W4A16), the reference included, so a quality regression
shows up on the same history page as a slowdown. GSM8K comes with the package."""

from harness.eval.loss import evaluate_loss
from harness.gsm8k import load_gsm8k
from harness.inject import QuantInjector
from harness.models import load_model
from harness.srdd import scan

LOSS_FORMATS = ["none", "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "nvfp4"]


class WeightScan:
    params = ["mxfp4", "nvfp4"]
    param_names = ["format"]
    number = 1
    repeat = 3
    warmup_time = 0
    timeout = 600

    def setup(self, name):
        self.model, _ = load_model("smollm2-135m")

    def time_weight_scan(self, name):
        scan.weight_scan(self.model, name, scan.ScanResult())


class AnswerLoss:
    params = LOSS_FORMATS
    param_names = ["format"]
    timeout = 900

    def setup(self, name):
        self.model, self.tok = load_model("smollm2-135m")
        self.items = load_gsm8k("test", 32)

    def track_answer_loss(self, name):
        with QuantInjector(self.model, "mxfp4" if name == "none" else name) as injector:
            summary = evaluate_loss(self.model, self.tok, self.items, injector).summary()
        return summary["reference_loss" if name == "none" else "loss"]

    track_answer_loss.unit = "nats/token"
