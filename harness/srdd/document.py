"""The scan result as a typed document (schema version ``SCHEMA_VERSION``): what ``harness scan``
writes as JSON, what the report renders and ``harness compare`` reads back.

JSON layout: ``layers[i]`` = ``{name, problematic, reasons: [{rule, metric, tensor, evidence}],
pointers: [...] (local detectors that pointed at the layer: no verdict), why: [...] (its Linears'
local detectors, when problematic), label (the exact attribution's harmful / negligible /
beneficial / inconclusive), metrics: {...}}``; ``attribution[i]`` = ``{layer, delta_loss, ci:
[low, high], kl, kl_ci, harmful, label, items}`` (``layer == "all"`` first: every layer
quantized; exact numbers only, for every layer or, two-stage, the layers the screen or a detector
picked); ``screen[i]`` = ``{layer, kl, kl_ci, delta_loss, delta_loss_ci, items, exact}`` (the
Fisher screen's *estimates* for every layer, ``harness.srdd.sensitivity``; empty when attribution
ran exactly over all layers); ``recommendation`` = ``{action, ..., predicted_recovery,
bits_per_weight, budget_bits, confirmed, control_p, verification: {recovery, recovery_ci,
predicted_recovery, budget_bits, heldout_items, control_recoveries, control_p, ...}}``.

Version 2 documents (before held-out verification) are read too: their attribution labels are
recomputed with today's band, their verification (5 draws on the choosing items) is re-judged by the
rank test (``control_p`` ≥ 1/6: never confirmed) with empty ``heldout_items``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from harness import atomic
from harness.srdd.attribution import NEGLIGIBLE_DELTA, Attribution, label
from harness.srdd.criteria import LayerFinding, Reason, Recommendation
from harness.srdd.sensitivity import Screened
from harness.srdd.verify import Verification, judge

SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)


@dataclass
class ModuleReport:
    """One Linear: its decoder layer, weight shape, format, and per kind (``weight``/``input``)
    the detectors with their Gaussian floors; ``output_error`` when weights were quantized."""

    name: str
    layer: str | None
    shape: list[int]
    format: str | None
    metrics: dict[str, dict[str, float]]


@dataclass
class LayerReport:
    name: str
    problematic: bool
    reasons: list[Reason]
    metrics: dict[str, float]
    pointers: list[Reason] = field(default_factory=list)
    why: list[str] = field(default_factory=list)
    label: str | None = None

    @classmethod
    def of(cls, finding: LayerFinding) -> LayerReport:
        return cls(
            finding.name,
            finding.problematic,
            list(finding.reasons),
            dict(finding.metrics),
            list(finding.pointers),
            list(finding.why),
            finding.label,
        )

    @classmethod
    def from_json(cls, d: dict) -> LayerReport:
        return cls(
            d["name"],
            d["problematic"],
            [Reason(**r) for r in d["reasons"]],
            d["metrics"],
            [Reason(**r) for r in d.get("pointers", [])],
            list(d.get("why", [])),
            d.get("label"),
        )


@dataclass
class AttributionEntry:
    layer: str
    delta_loss: float
    ci: list[float]
    kl: float
    kl_ci: list[float]
    harmful: bool  # label == "harmful": the Δloss CI lies above the negligible band
    items: int
    label: str = ""

    @classmethod
    def of(cls, row: Attribution, delta: float = NEGLIGIBLE_DELTA) -> AttributionEntry:
        lab = row.label(delta)
        return cls(
            row.layer,
            row.delta_loss,
            list(row.ci),
            row.kl,
            list(row.kl_ci),
            lab.value == "harmful",
            len(row.kl_items),
            lab.value,
        )


@dataclass
class ScreenEntry:
    """The screen's estimates for one layer (never a verdict: those rest on exact rows)."""

    layer: str
    kl: float
    kl_ci: list[float]
    delta_loss: float
    delta_loss_ci: list[float]
    items: int
    exact: bool

    @classmethod
    def of(cls, row: Screened, exact: set[str]) -> ScreenEntry:
        return cls(
            row.layer,
            row.kl,
            list(row.kl_ci),
            row.delta_loss,
            list(row.ci),
            len(row.kl_items),
            row.layer in exact,
        )


@dataclass
class RecommendationReport(Recommendation):
    """The rules' recommendation and what its verification against a control found."""

    confirmed: bool | None = None  # None: nothing to verify (no_action, or no held-out items)
    control_recovery: float | None = None
    control_p: float | None = None
    verification: Verification | None = None

    @classmethod
    def of(cls, rec: Recommendation, verification: Verification | None) -> RecommendationReport:
        return cls(
            **dataclasses.asdict(rec),
            confirmed=verification.confirmed if verification else None,
            control_recovery=verification.control_recovery if verification else None,
            control_p=verification.control_p if verification else None,
            verification=verification,
        )


@dataclass
class ScanDocument:
    model: str
    format: str
    point: str
    harness_version: str
    prompts: int
    tokens: int
    evaluation_items: int
    rules: dict[str, float]
    thresholds: dict[str, float | None]
    modules: list[ModuleReport]
    layers: list[LayerReport]
    attribution: list[AttributionEntry]
    recommendation: RecommendationReport
    timings_s: dict[str, float] = field(default_factory=dict)
    screen: list[ScreenEntry] = field(default_factory=list)
    coverage: dict = field(default_factory=dict)  # harness.inject.Coverage.to_json() of the scanned injection
    schema_version: int = SCHEMA_VERSION

    @property
    def problematic_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.problematic]

    @property
    def has_nonfinite(self) -> bool:
        return any(r.rule == "non-finite" for layer in self.layers for r in layer.reasons)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> ScanDocument:
        if doc.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"scan document schema version {doc.get('schema_version')!r}; this harness reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (rerun the scan)"
            )
        if doc["schema_version"] == 2:
            doc = _upgrade_v2(doc)
        rec = dict(doc["recommendation"])
        ver = rec.pop("verification")
        return cls(
            **{k: doc[k] for k in ("model", "format", "point", "harness_version", "prompts", "tokens")},
            evaluation_items=doc["evaluation_items"],
            rules=doc["rules"],
            thresholds=doc["thresholds"],
            modules=[ModuleReport(**m) for m in doc["modules"]],
            layers=[LayerReport.from_json(d) for d in doc["layers"]],
            attribution=[AttributionEntry(**a) for a in doc["attribution"]],
            recommendation=RecommendationReport(**rec, verification=Verification(**ver) if ver else None),
            timings_s=doc.get("timings_s", {}),
            screen=[ScreenEntry(**s) for s in doc.get("screen", [])],
            coverage=doc.get("coverage", {}),
            schema_version=doc["schema_version"],
        )

    def write(self, path: str | Path) -> Path:
        """The document as JSON at ``path``, all-or-nothing (:func:`harness.atomic.write_text`)."""
        atomic.write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> ScanDocument:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable scan JSON ({err!r})") from err
        needed = ("schema_version", "model", "format", "point", "layers")
        missing = [k for k in needed if k not in doc] if isinstance(doc, dict) else list(needed)
        if missing:
            raise ValueError(f"{path} is not a scan JSON (`scan --output`): missing {', '.join(missing)}")
        try:
            return cls.from_json(doc)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable scan JSON ({err!r})") from err


def _upgrade_v2(doc: dict) -> dict:
    """A version 2 document in version 3's layout (module docstring); the version stays 2."""
    doc = dict(doc)
    attribution = []
    for a in doc["attribution"]:
        lab = label(a["ci"]).value
        attribution.append({**a, "harmful": lab == "harmful", "label": lab})
    doc["attribution"] = attribution
    rec = dict(doc["recommendation"])
    ver = rec.get("verification")
    if ver:
        keep = {f.name for f in dataclasses.fields(Verification)}
        draws = ver["control_recoveries"]
        p, confirmed, verdict = judge(ver["recovery"], ver["recovery"], draws)
        ver = {k: v for k, v in ver.items() if k in keep} | {
            "confirmed": confirmed,
            "verdict": f"{verdict} (re-judged; measured on the choosing items, not held out)",
            "heldout_items": [],
            "predicted_recovery": None,
            "budget_bits": None,
            "bits_per_weight": None,
            "control_items": ver["items"],
            "proposal_control_recovery": ver["recovery"],
            "rank": 1 + sum(d > ver["recovery"] for d in draws),
            "control_p": p,
        }
        rec["control_p"], rec["confirmed"] = p, confirmed
    rec["verification"] = ver
    doc["recommendation"] = rec
    return doc
