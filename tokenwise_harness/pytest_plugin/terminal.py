"""What the harness prints (controller only): the session header, the closing table, and the
one message about missing baselines.

Header: one line each for the model(s) with their fingerprint prefix, the cache (path,
tokens), the thresholds file (or "none"), the baselines dir(s), the grid and the device.

Closing table ("tokenwise precision" section): case, nmse, its limit, its baseline, the
change from the baseline, verdict; the failing cases first (worst nmse first, at most
FAILED_ROWS), then the worst passing ones (TABLE_ROWS); `-rA` or `-v` lists every case. Fitted
to the terminal width: the case id is cut in its middle when the line would not fit.

Missing baselines: printed after pytest's short test summary (session.py's wrapper hook), so
it is the last thing before the counts line: how many cases have no baseline, where they were
looked for, and the command that creates them, which works when pasted (rerun.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tokenwise_harness.text import plural

TABLE_ROWS = 10  # worst passing cases shown (all with -rA or -v)
FAILED_ROWS = 20  # failing cases shown at most (all with -rA or -v)
MIN_CASE_WIDTH = 24
TABLE_HEADERS = ("nmse", "limit", "baseline", "change", "verdict")


# ------------------------------------------------------------ header

def _short(path: Path) -> str:
    from tokenwise_harness.verdict.thresholds import display_path

    return display_path(path)


def run_facts(harness: Any) -> dict[str, str]:
    """{what: text} of the run's inputs: models, cache, thresholds, baselines, grid, device.
    `harness`: the HarnessSession (not imported: session.py imports this module)."""
    facts = {}
    for v in harness.variants:
        mdir = harness.model_dir(v)
        facts["smoothed model" if v.smooth else "model"] = f"{v.model_dir} (fingerprint {mdir.fingerprint[:12]})"
    if harness.cache is not None:
        facts["cache"] = (f"{harness.cache.path} ({harness.cache.n_tokens:,} tokens, "
                          f"{plural(len(harness.cache.targets), 'projection')})")
    facts["thresholds"] = (str(harness.thresholds_path) if harness.thresholds_path
                           else "none (built-in defaults; --thresholds=FILE or thresholds.yaml at the rootdir)")
    facts["baselines"] = ", ".join(_short(d) + "/" for d in harness.store_dirs())
    grid = harness.grid
    ranks = ",".join(str(r) for r in sorted({c.rank for c in grid}))
    qspecs = ",".join(dict.fromkeys(f"{c.fmt}@{c.blk}" for c in grid if c.fmt != "none"))
    facts["grid"] = (f"{plural(len(grid), 'config')} (ranks {ranks} x {qspecs or 'none'}, "
                     f"{harness.spec_options['grid_mode']}); device {harness.device}")
    return facts


def header(harness: Any) -> list[str]:
    return [f"tokenwise: {k} {v}" for k, v in run_facts(harness).items()]


# ------------------------------------------------------------ closing table

def _e(value) -> str:
    return "-" if value is None else f"{value:.3e}"


def _change(value, base) -> str:
    if value is None or not base:
        return "-"
    ratio = value / base
    return f"x{ratio:.3g}" if ratio >= 10 or ratio <= 0.1 else f"{100 * (ratio - 1):+.1f}%"


def table_cells(p: dict) -> list[str]:
    """[nmse, limit, baseline, change, verdict] of one recorded case."""
    value = p["metrics"].get("nmse")
    limit = ((p.get("limits") or {}).get("nmse") or {}).get("limit")
    base = (p.get("baseline") or {}).get("nmse")
    return [_e(value), _e(limit), _e(base), _change(value, base), p["verdict"]]


def fit_case(case_id: str, width: int) -> str:
    """case_id shortened to `width` characters: first without its block word (the projection
    names it), then without "_proj", then cut in its middle (layer and config stay)."""
    for short in (case_id, case_id.replace("-self_attn-", "-").replace("-mlp-", "-")):
        if len(short) <= width:
            return short
    short = short.replace("_proj-", "-")
    if len(short) <= width:
        return short
    keep = width - 1
    return short[: keep - keep // 2] + "~" + short[len(short) - keep // 2:]


def closing_table(payloads: list[dict], width: int, show_all: bool) -> list[str]:
    """The table's lines: failing cases, then the worst passing ones, fitted to `width`."""
    def worst_first(p):
        v = p["metrics"].get("nmse")
        return (v is not None, -(v or 0.0), p["case_id"])

    failing = sorted((p for p in payloads if p["verdict"] != "passed"), key=worst_first)
    passing = sorted((p for p in payloads if p["verdict"] == "passed"), key=worst_first)
    notes = []
    if not show_all:
        if len(failing) > FAILED_ROWS:
            notes.append(f"{len(failing) - FAILED_ROWS} more failing")
            failing = failing[:FAILED_ROWS]
        if len(passing) > TABLE_ROWS:
            notes.append(f"{len(passing) - TABLE_ROWS} more passing")
            passing = passing[:TABLE_ROWS]
    rows = [(p["case_id"], table_cells(p)) for p in failing + passing]
    widths = [max([len(h)] + [len(cells[i]) for _c, cells in rows]) for i, h in enumerate(TABLE_HEADERS)]
    # case, two spaces, then the columns one space apart; pytest writes at most width - 1
    room = width - 1 - 2 - sum(widths) - (len(widths) - 1)
    case_w = max(MIN_CASE_WIDTH, min(max([4] + [len(c) for c, _cells in rows]), room))

    def line(case: str, cells) -> str:
        numbers = [f"{c:>{w}}" for c, w in zip(cells[:-1], widths)]
        return f"{fit_case(case, case_w):<{case_w}}  " + " ".join(numbers + [cells[-1]])

    lines = [line("case", TABLE_HEADERS)] + [line(c, cells) for c, cells in rows]
    if notes:
        lines.append(f"... {' and '.join(notes)} cases (-rA or -v lists all)")
    return lines


def _width(tr: pytest.TerminalReporter) -> int:
    tw = getattr(tr, "_tw", None)  # pytest's TerminalWriter knows the width it writes to
    return getattr(tw, "fullwidth", None) or shutil.get_terminal_size().columns


def _show_all(config: pytest.Config) -> bool:
    return "A" in (getattr(config.option, "reportchars", "") or "") or config.get_verbosity() > 0


def summary(harness: Any, tr: pytest.TerminalReporter) -> None:
    """The closing table, baseline updates, stale baselines, warnings and the report paths."""
    if harness.is_worker or not harness.recorded:
        return
    tr.section("tokenwise precision")
    for text in closing_table(list(harness.recorded.values()), _width(tr), _show_all(harness.config)):
        tr.write_line(text)
    for update in harness.update_summaries:
        for text in update.lines():
            tr.write_line(text)
    if harness.stale:
        verb = "deleted" if harness.update else "stale (no such case any more; --update-baselines deletes them)"
        tr.write_line(f"baselines {verb}: {len(harness.stale)}")
        for cid in harness.stale[:TABLE_ROWS]:
            tr.write_line(f"  {cid}")
    for w in harness.warnings:
        tr.write_line(f"warning: {w}")
    if harness.report_path:
        tr.write_line(f"report: {harness.report_path}")
    if harness.html_path:
        tr.write_line(f"html report: {harness.html_path}")


def missing_baselines(harness: Any, tr: pytest.TerminalReporter) -> None:
    """One message for every case without a baseline: how many, where, and the command."""
    if harness.is_worker:
        return
    missing = sorted(cid for cid, p in harness.recorded.items() if p.get("no_baseline"))
    if not missing:
        return
    dirs = " and ".join(_short(d) + "/" for d in harness.store_dirs())
    tr.write_line(f"tokenwise: {plural(len(missing), 'case')} of {len(harness.recorded)} "
                  f"{'has' if len(missing) == 1 else 'have'} no baseline in {dirs}; create "
                  f"{'it' if len(missing) == 1 else 'them'} (existing baselines are kept) with:",
                  yellow=True, bold=True)
    tr.write_line(f"    {harness.rerun_command('--update-baselines-new')}")
