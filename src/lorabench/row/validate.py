"""Estimator against measurement, per cell and per component (`lorabench validate`).

For every measured row (status ok): parameter, gradient and optimizer-state
bytes must match the estimate to the byte; the peak's relative error
100·(est − measured)/measured is summarised as median and p95 of |error|. The
estimate is recomputed from the row (so a changed estimator is checked against
old measurements); when the row's model cannot be rebuilt exactly (a custom
model whose non-stored fields differ from the defaults) the est_* values stored
in the row at measurement time are used instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base.stats import percentile
from ..spec.schema import ConfigError
from .codec import estimate_fields

COMPONENTS = (("param_bytes", "est_param_bytes"), ("grad_bytes", "est_grad_bytes"),
              ("optimizer_state_bytes", "est_optimizer_state_bytes"))


@dataclass
class CellCheck:
    cell: str
    scenario: str
    components_exact: dict          # name -> bool
    peak_error_pct: float
    est_peak_bytes: int
    measured_peak_bytes: int
    est_peak_phase: str | None
    measured_peak_phase: str | None
    source: str                      # "recomputed" | "stored"


@dataclass
class Report:
    checks: list[CellCheck] = field(default_factory=list)
    excluded: int = 0

    @property
    def abs_errors(self) -> list[float]:
        return sorted(abs(c.peak_error_pct) for c in self.checks)

    def summary(self) -> dict:
        errs = self.abs_errors
        mism = {name: sum(not c.components_exact[name] for c in self.checks) for name, _ in COMPONENTS}
        return {
            "cells": len(self.checks), "excluded": self.excluded,
            "median_abs_peak_error_pct": percentile(errs, 50) if errs else None,
            "p95_abs_peak_error_pct": percentile(errs, 95) if errs else None,
            "max_abs_peak_error_pct": errs[-1] if errs else None,
            "phase_matches": sum(c.est_peak_phase == c.measured_peak_phase for c in self.checks),
            "component_mismatches": mism,
        }

    def failures(self, max_median_pct: float | None, max_p95_pct: float | None) -> list[str]:
        s = self.summary()
        out = [f"{n} differs from the estimate in {k} cell(s)" for n, k in s["component_mismatches"].items() if k]
        if (max_median_pct is not None or max_p95_pct is not None) and not self.checks:
            out.append("no measured cell to hold to the bounds (--max-median-pct, --max-p95-pct)")
        if max_median_pct is not None and s["median_abs_peak_error_pct"] is not None and s["median_abs_peak_error_pct"] > max_median_pct:
            out.append(f"median |peak error| {s['median_abs_peak_error_pct']:.2f} % > {max_median_pct} %")
        if max_p95_pct is not None and s["p95_abs_peak_error_pct"] is not None and s["p95_abs_peak_error_pct"] > max_p95_pct:
            out.append(f"p95 |peak error| {s['p95_abs_peak_error_pct']:.2f} % > {max_p95_pct} %")
        return out


def check_row(row: dict, source_name: str = "results") -> CellCheck | None:
    """One measured row against its estimate; None for rows without a measured peak."""
    if row.get("status") != "ok" or not row.get("peak_allocated_bytes"):
        return None
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "precision", "lora_rank", "accumulation",
                "checkpointing", "batch_size", "warmup_steps", "steps"):
        if key not in row:
            raise ConfigError(source_name, f"cell {row.get('cell')!r}.{key}", "missing in a measured row")
    est, source = estimate_fields(row), "recomputed"  # never raises: est_error and None fields instead
    if est.get("est_param_bytes") is None or (row.get("est_param_bytes") is not None and est["est_param_bytes"] != row["est_param_bytes"]):
        est, source = row, "stored"  # the model could not be rebuilt exactly: use what the worker stored
    if est.get("est_peak_bytes") is None:
        return None
    measured = row["peak_allocated_bytes"]
    return CellCheck(
        cell=str(row.get("cell")), scenario=str(row.get("scenario")),
        components_exact={m: row[m] == est.get(e) for m, e in COMPONENTS},
        peak_error_pct=100.0 * (est["est_peak_bytes"] - measured) / measured,
        est_peak_bytes=int(est["est_peak_bytes"]), measured_peak_bytes=int(measured),
        est_peak_phase=est.get("est_peak_phase"), measured_peak_phase=row.get("peak_phase"), source=source)


def validate_rows(rows: list[dict], source_name: str = "results") -> Report:
    rep = Report()
    for row in rows:
        c = check_row(row, source_name)
        if c is None:
            rep.excluded += 1
        else:
            rep.checks.append(c)
    return rep
