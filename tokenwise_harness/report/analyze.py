"""Rankings and a heatmap from a report (seed §6): `tokenwise-precision analyze`.

Outputs in out_dir (each written atomically):
- ranking1.csv / ranking1.md  Ranking-1: per config, layer-blocks ranked by the block's
  agg nmse_mean_over_proj, and again by nmse_max_over_proj (column `order_by`).
- ranking2.csv / ranking2.md  Ranking-2: per config, every projection ranked by nmse.
- heatmap.png                 log10(nmse), layers x projections, one panel per config
                              (report/plots.py).
- report.html (--html)        one self-contained page: heatmap, sortable table of every case
                              (report/html.py).

Rankings put the most sensitive (largest nmse) first; a null (non-finite) nmse ranks above
every number, since it flags a broken case; ties keep forward order (layer, block, proj).
Configs appear in the grid's order. The CSVs hold every row with full-precision floats
(empty cell = null); the Markdown tables show the first MD_MAX_ROWS rows of each ranking.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.atomic import check_not_input, check_writable_dir, write_text_atomic
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.report.document import BLOCK_ORDER, iter_agg, iter_metrics, load_report, report_configs

MD_MAX_ROWS = 50

RANK1_COLUMNS = (
    "config", "order_by", "rank", "layer", "block", "nmse_mean_over_proj", "nmse_max_over_proj",
    "n_proj", "worst_proj", "sqnr_db", "token_rel_l2_max",
)
RANK2_COLUMNS = (
    "config", "rank", "layer", "block", "proj", "nmse", "sqnr_db", "token_rel_l2_mean",
    "token_rel_l2_max", "token_l2_max", "n_tokens",
)
RANK1_ORDERS = ("nmse_mean_over_proj", "nmse_max_over_proj")
OUTPUT_NAMES = ("ranking1.csv", "ranking1.md", "ranking2.csv", "ranking2.md", "heatmap.png", "report.html")


def analyze(report_path: str | Path, out_dir: str | Path, flag: str = "--report", html: bool = False,
            vlim: tuple[float, float] | None = None, label: str | None = None) -> list[Path]:
    """Write the rankings (CSV + Markdown), the heatmap and (html) report.html; return the paths
    written. vlim: a color scale shared with other reports (plots.color_limits); label: what
    this report is (e.g. "no calibration"), shown in the pictures' titles."""
    report = load_report(report_path, flag)
    if not any(True for _ in iter_metrics(report)):
        raise HarnessError(f"{flag}: {report_path} has no projections under by_layer; nothing to analyze")
    for name in OUTPUT_NAMES:  # before anything is written: no output lands on the report it reads
        check_not_input(Path(out_dir) / name, "--out_dir", inputs=[(flag, report_path)])
    out_dir = check_writable_dir(Path(out_dir), "--out_dir", create=True)
    title = _source_line(report, report_path)
    rank1, rank2 = ranking1(report), ranking2(report)
    written = [
        _write_csv(out_dir / "ranking1.csv", RANK1_COLUMNS, rank1),
        _write_md(out_dir / "ranking1.md", _ranking1_md(rank1, title)),
        _write_csv(out_dir / "ranking2.csv", RANK2_COLUMNS, rank2),
        _write_md(out_dir / "ranking2.md", _ranking2_md(rank2, title)),
    ]
    png = write_heatmap(report, out_dir / "heatmap.png", vlim=vlim, label=label)
    if png is not None:
        written.append(png)
    if html:
        from tokenwise_harness.report.html import write_html

        written.append(write_html(report, out_dir / "report.html", "--out_dir", source=str(report_path),
                                  vlim=vlim, label=label))
    return written


# ---------------------------------------------------------------- rankings

def _sensitivity_key(value: float | None, layer: int, block: str, proj: str = "") -> tuple:
    """Sort key: null first, then larger value first, then forward order."""
    proj_i = PROJ_ORDER.index(proj) if proj in PROJ_ORDER else -1
    return (value is not None, -value if value is not None else 0.0, layer, BLOCK_ORDER.index(block), proj_i)


def _block_worst(report: Mapping) -> dict:
    """{(layer, block, cfg): (worst proj, its sqnr_db, max token_rel_l2_max)} over the block's projections."""
    groups: dict = {}
    for layer, block, proj, cfg, m in iter_metrics(report):
        groups.setdefault((layer, block, cfg), []).append((proj, m))
    out = {}
    for (layer, block, cfg), items in groups.items():
        proj, m = min(items, key=lambda it: _sensitivity_key(it[1]["nmse"], layer, block, it[0]))
        rels = [it[1]["token_rel_l2_max"] for it in items]
        rel = None if None in rels else max(rels)
        out[(layer, block, cfg)] = (proj, m["sqnr_db"], rel)
    return out


def ranking1(report: Mapping) -> list[dict]:
    """Ranking-1 rows: per config, per order_by (mean, then max), layer-blocks most sensitive first."""
    worst = _block_worst(report)
    aggs = list(iter_agg(report))
    rows = []
    for cfg in report_configs(report):
        entries = [(layer, block, agg) for layer, block, c, agg in aggs if c == cfg]
        for order_by in RANK1_ORDERS:
            entries.sort(key=lambda e: _sensitivity_key(e[2][order_by], e[0], e[1]))
            for i, (layer, block, agg) in enumerate(entries, 1):
                proj, sqnr, rel = worst.get((layer, block, cfg), (None, None, None))
                rows.append({
                    "config": cfg, "order_by": order_by, "rank": i, "layer": layer, "block": block,
                    "nmse_mean_over_proj": agg["nmse_mean_over_proj"],
                    "nmse_max_over_proj": agg["nmse_max_over_proj"], "n_proj": agg["n_proj"],
                    "worst_proj": proj, "sqnr_db": sqnr, "token_rel_l2_max": rel,
                })
    return rows


def ranking2(report: Mapping) -> list[dict]:
    """Ranking-2 rows: per config, every projection most sensitive first."""
    cases = list(iter_metrics(report))
    rows = []
    for cfg in report_configs(report):
        entries = [(layer, block, proj, m) for layer, block, proj, c, m in cases if c == cfg]
        entries.sort(key=lambda e: _sensitivity_key(e[3]["nmse"], e[0], e[1], e[2]))
        for i, (layer, block, proj, m) in enumerate(entries, 1):
            row = {"config": cfg, "rank": i, "layer": layer, "block": block, "proj": proj}
            row.update({k: m[k] for k in RANK2_COLUMNS[5:]})
            rows.append(row)
    return rows


# ---------------------------------------------------------------- CSV / Markdown

def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def _write_csv(path: Path, columns: Iterable[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    write_text_atomic(path, buf.getvalue(), "--out_dir")
    return path


def _write_md(path: Path, text: str) -> Path:
    write_text_atomic(path, text, "--out_dir")
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def _md_table(headers: list[str], align: str, rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _capped(rows: list[dict], csv_name: str) -> tuple[list[dict], list[str]]:
    if len(rows) <= MD_MAX_ROWS:
        return rows, []
    more = len(rows) - MD_MAX_ROWS
    return rows[:MD_MAX_ROWS], ["", f"*{more} less sensitive rows not shown; all rows are in {csv_name}.*"]


def _ranking1_md(rows: list[dict], source: str) -> str:
    lines = ["# Ranking-1: layer-blocks by nmse aggregated over projections", "", source,
             "", "Most sensitive first. `worst proj` is the block's projection with the largest nmse."]
    headers = ["rank", "layer", "block", "nmse mean", "nmse max", "n_proj", "worst proj",
               "worst sqnr_db", "token_rel_l2_max"]
    for (cfg, order_by), group in _groups(rows, ("config", "order_by")):
        shown, note = _capped(group, "ranking1.csv")
        table = [[str(r["rank"]), str(r["layer"]), r["block"], _fmt(r["nmse_mean_over_proj"], ".3e"),
                  _fmt(r["nmse_max_over_proj"], ".3e"), str(r["n_proj"]), r["worst_proj"],
                  _fmt(r["sqnr_db"], ".2f"), _fmt(r["token_rel_l2_max"], ".3e")] for r in shown]
        lines += ["", f"## `{cfg}` by {order_by}", ""]
        lines += _md_table(headers, ["---:", "---:", "---", "---:", "---:", "---:", "---", "---:", "---:"], table)
        lines += note
    return "\n".join(lines) + "\n"


def _ranking2_md(rows: list[dict], source: str) -> str:
    lines = ["# Ranking-2: every projection by nmse", "", source, "", "Most sensitive first."]
    headers = ["rank", "layer", "block", "proj", "nmse", "sqnr_db", "token_rel_l2_mean", "token_rel_l2_max", "n_tokens"]
    for (cfg,), group in _groups(rows, ("config",)):
        shown, note = _capped(group, "ranking2.csv")
        table = [[str(r["rank"]), str(r["layer"]), r["block"], r["proj"], _fmt(r["nmse"], ".3e"),
                  _fmt(r["sqnr_db"], ".2f"), _fmt(r["token_rel_l2_mean"], ".3e"),
                  _fmt(r["token_rel_l2_max"], ".3e"), str(r["n_tokens"])] for r in shown]
        lines += ["", f"## `{cfg}`", ""]
        lines += _md_table(headers, ["---:", "---:", "---", "---", "---:", "---:", "---:", "---:", "---:"], table)
        lines += note
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[tuple, list[dict]]]:
    """Consecutive runs of rows sharing the values of `keys`: [(values, rows)]."""
    out: list = []
    for row in rows:
        values = tuple(row[k] for k in keys)
        if out and out[-1][0] == values:
            out[-1][1].append(row)
        else:
            out.append((values, [row]))
    return out


def _source_line(report: Mapping, report_path: Any) -> str:
    meta = report["meta"]
    return (f"Report `{os.path.basename(str(report_path))}` · cache `{os.path.basename(meta['xy_path'])}` · "
            f"smooth: {str(meta['smooth']).lower()} · grid_mode: {meta['grid_mode']}")


# ---------------------------------------------------------------- heatmap

def write_heatmap(report: Mapping, path: Path, vlim: tuple[float, float] | None = None,
                  label: str | None = None, flag: str = "--out_dir") -> Path | None:
    """heatmap.png: log10(nmse), layers x projections, one panel per config (report/plots.py)."""
    from tokenwise_harness.report import plots

    if not plots.matplotlib_available("analyze"):
        return None
    fig = plots.heatmap_figure(report, vlim=vlim, label=label)
    return None if fig is None else plots.write_png(fig, path, flag)
