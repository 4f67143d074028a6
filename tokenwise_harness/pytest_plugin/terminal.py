"""What the harness prints: the header line and the end-of-session summary (controller only)."""

from __future__ import annotations

import math
from typing import Any

import pytest

SUMMARY_ROWS = 10


def header(harness: Any) -> str:
    """`harness`: the HarnessSession (not imported: session.py imports this module)."""
    models = ", ".join(f"{v.model_dir}{' (smoothed)' if v.smooth else ''}" for v in harness.variants)
    return f"tokenwise: {models}; grid {len(harness.grid)} configs; device {harness.device}"


def summary(harness: Any, tr: pytest.TerminalReporter) -> None:
    """The worst cases by nmse, baseline updates, stale baselines, warnings and the report path."""
    if harness.is_worker or not harness.recorded:
        return
    tr.section("tokenwise precision")
    worst = sorted(harness.recorded.values(), key=lambda p: -_num(p["metrics"]["nmse"]))
    tr.write_line(f"{'case':<60} {'nmse':>11} {'sqnr_db':>8} {'rel_l2_max':>11} verdict")
    for p in worst[:SUMMARY_ROWS]:
        m = p["metrics"]
        tr.write_line(f"{p['case_id']:<60} {_num(m['nmse']):>11.4e} {_num(m['sqnr_db']):>8.2f} "
                      f"{_num(m['token_rel_l2_max']):>11.4e} {p['verdict']}")
    if len(worst) > SUMMARY_ROWS:
        tr.write_line(f"... {len(worst) - SUMMARY_ROWS} more cases (see --tokenwise-report)")
    for update in harness.update_summaries:
        for line in update.lines():
            tr.write_line(line)
    if harness.stale:
        verb = "deleted" if harness.update else "stale (no such case any more; --update-baselines deletes them)"
        tr.write_line(f"baselines {verb}: {len(harness.stale)}")
        for cid in harness.stale[:SUMMARY_ROWS]:
            tr.write_line(f"  {cid}")
    for w in harness.warnings:
        tr.write_line(f"warning: {w}")
    if harness.report_path:
        tr.write_line(f"report: {harness.report_path}")


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)
