"""The baseline policy of one test's check: compare a case's metrics with its stored baseline
(:mod:`harness.baselines`), falling back to the CPU baseline of the same dtype for a CUDA case
with no CUDA baseline, and judge per-item metrics with the paired gate (:mod:`harness.gate`).
Every refusal is a :class:`~harness.baselines.BaselineError` whose message is the whole story."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.baselines import BaselineError, comparison_table, cpu_fallback, read_baseline_file, tolerance_for
from harness.gate import INCONCLUSIVE, PASS, gate_table, worst_outcome


@dataclass(frozen=True)
class BaselineCheck:
    """``<baselines>/<model>/<device>/<suite>.json`` of a session: ``path``, the model
    ``identity`` it must hold, whether an inconclusive paired gate passes, and the command that
    creates a missing case."""

    path: Path
    identity: dict[str, object] | None
    accept_inconclusive: bool
    create_command: str

    def stored(self, case_id: str) -> dict[str, float] | None:
        """The case's stored metrics (None if it has none); BaselineError for a corrupt file or
        one of another model."""
        return read_baseline_file(self.path, self.identity)[0].get(case_id)

    def judge(self, case_id: str, metrics: dict[str, float], items: dict[str, list[float]]) -> str:
        """The comparison table (and the paired per-item table) when the case is within its
        tolerances; BaselineError saying why when it is not or has no baseline. Metrics with
        per-item ``items`` are judged by the paired gate against the stored items."""
        stored, stored_items = read_baseline_file(self.path, self.identity)
        tolerance, source = tolerance_for, self.path
        if case_id not in stored and (fallback := cpu_fallback(self.path, case_id, self.identity)):
            source, stored, stored_items, tolerance = fallback
        if case_id not in stored:
            raise BaselineError(
                f"no baseline for case {case_id!r} in {self.path}; create it with:\n    {self.create_command}"
            )
        gated = set(items)
        ok, table = comparison_table(
            {k: v for k, v in stored[case_id].items() if k not in gated},
            {k: v for k, v in metrics.items() if k not in gated},
            tolerance,
        )
        if items:
            results, paired = gate_table(stored_items.get(case_id, {}), items)
            ok &= worst_outcome(results) in ((PASS, INCONCLUSIVE) if self.accept_inconclusive else (PASS,))
            table = f"{table}\n\nper-item, paired against the baseline's items:\n{paired}"
        if not ok:
            raise BaselineError(f"{case_id} moved beyond tolerance against {source}:\n{table}")
        return table
