"""Rankings and a heatmap from a report (seed §6): `tokenwise-precision analyze`.

Outputs in out_dir (each written atomically):
- ranking1.csv / ranking1.md  Ranking-1: per config, layer-blocks ranked by the block's
  agg nmse_mean_over_proj, and again by nmse_max_over_proj (column `order_by`).
- ranking2.csv / ranking2.md  Ranking-2: per config, every projection ranked by nmse.
- heatmap.png                 log10(nmse), layers x projections, one panel per config.

Rankings put the most sensitive (largest nmse) first; a null (non-finite) nmse ranks above
every number, since it flags a broken case; ties keep forward order (layer, block, proj).
Configs appear in the grid's order. The CSVs hold every row with full-precision floats
(empty cell = null); the Markdown tables show the first MD_MAX_ROWS rows of each ranking.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.atomic import atomic_path, check_writable_dir, write_text_atomic
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.report.document import BLOCK_ORDER, iter_agg, iter_metrics, load_report, report_configs

MD_MAX_ROWS = 50
MAX_PANELS = 12
ANNOTATE_MAX_LAYERS = 8  # heatmap cells carry their nmse value up to this many layers

RANK1_COLUMNS = (
    "config", "order_by", "rank", "layer", "block", "nmse_mean_over_proj", "nmse_max_over_proj",
    "n_proj", "worst_proj", "sqnr_db", "token_rel_l2_max",
)
RANK2_COLUMNS = (
    "config", "rank", "layer", "block", "proj", "nmse", "sqnr_db", "token_rel_l2_mean",
    "token_rel_l2_max", "token_l2_max", "n_tokens",
)
RANK1_ORDERS = ("nmse_mean_over_proj", "nmse_max_over_proj")


def analyze(report_path: str | Path, out_dir: str | Path, flag: str = "--report") -> list[Path]:
    """Write the rankings (CSV + Markdown) and the heatmap; return the paths written."""
    report = load_report(report_path, flag)
    if not any(True for _ in iter_metrics(report)):
        raise HarnessError(f"{flag}: {report_path} has no projections under by_layer; nothing to analyze")
    out_dir = check_writable_dir(Path(out_dir), "--out_dir", create=True)
    title = _source_line(report, report_path)
    rank1, rank2 = ranking1(report), ranking2(report)
    written = [
        _write_csv(out_dir / "ranking1.csv", RANK1_COLUMNS, rank1),
        _write_md(out_dir / "ranking1.md", _ranking1_md(rank1, title)),
        _write_csv(out_dir / "ranking2.csv", RANK2_COLUMNS, rank2),
        _write_md(out_dir / "ranking2.md", _ranking2_md(rank2, title)),
    ]
    png = write_heatmap(report, out_dir / "heatmap.png")
    if png is not None:
        written.append(png)
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

def _grid_values(report: Mapping, cfgs: list[str]) -> tuple[list[int], dict]:
    """Layers present and {cfg: rows x 7 of log10(nmse) or None (missing, zero, null)}."""
    cases = list(iter_metrics(report))
    layers = sorted({c[0] for c in cases})
    grids = {cfg: [[None] * len(PROJ_ORDER) for _ in layers] for cfg in cfgs}
    for layer, _block, proj, cfg, m in cases:
        if cfg in grids and m["nmse"] is not None and m["nmse"] > 0:
            grids[cfg][layers.index(layer)][PROJ_ORDER.index(proj)] = math.log10(m["nmse"])
    return layers, grids


def _color_limits(grids: dict) -> tuple[float, float]:
    values = [v for g in grids.values() for row in g for v in row if v is not None]
    if not values:
        return -1.0, 0.0
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def write_heatmap(report: Mapping, path: Path, max_panels: int = MAX_PANELS) -> Path | None:
    """heatmap.png: log10(nmse), layers x projections, one panel per config (at most max_panels)."""
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("analyze: matplotlib is not installed, heatmap.png skipped; "
                      "pip install 'tokenwise-harness[plots]'", stacklevel=2)
        return None
    all_cfgs = report_configs(report)
    cfgs = all_cfgs[:max_panels]
    layers, grids = _grid_values(report, cfgs)
    vmin, vmax = _color_limits(grids)
    ncols = min(len(cfgs), 4)
    nrows = math.ceil(len(cfgs) / ncols)
    panel_h = min(9.0, max(2.4, 1.1 + 0.22 * len(layers)))
    fig = Figure(figsize=(1.0 + 3.0 * ncols, 0.9 + panel_h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = _cmap()
    image = None
    for ax, cfg in zip(axes, cfgs):
        data = np.ma.masked_invalid(np.array(grids[cfg], dtype=float))
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        _style_panel(ax, cfg, layers)
        if len(layers) <= ANNOTATE_MAX_LAYERS:
            _annotate(ax, grids[cfg], (vmin + vmax) / 2)
    for ax in axes[len(cfgs):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(cfgs)]), label="log10(nmse)  (higher = more error)",
                 shrink=0.7, aspect=35)
    fig.suptitle(_heatmap_title(report, len(cfgs), len(all_cfgs)), fontsize=11)
    with atomic_path(path, "--out_dir") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d0d0d0")


def _style_panel(ax, cfg: str, layers: list[int]) -> None:
    step = 1 if len(layers) <= 24 else math.ceil(len(layers) / 24)
    ax.set_title(cfg, fontsize=9)
    ax.set_xticks(range(len(PROJ_ORDER)))
    ax.set_xticklabels([p.removesuffix("_proj") for p in PROJ_ORDER], fontsize=8)
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel("layer", fontsize=8)
    ax.axvline(3.5, color="white", linewidth=2)  # self_attn | mlp


def _annotate(ax, grid: list[list[float | None]], midpoint: float) -> None:
    """Write each cell's nmse into it (small grids only); light text on the dark end of viridis."""
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            if value is not None:
                color = "white" if value < midpoint else "black"
                ax.text(col, row, f"{10 ** value:.1e}", ha="center", va="center", fontsize=6, color=color)


def _heatmap_title(report: Mapping, shown: int, total: int) -> str:
    meta = report["meta"]
    title = (f"NMSE per projection (color: log10) · cache {os.path.basename(meta['xy_path'])} · "
             f"smooth={str(meta['smooth']).lower()}")
    note = "\ngray: no data, or nmse zero / not finite"
    if shown < total:
        note += f" · showing the first {shown} of {total} configs (all are in the rankings)"
    return title + note
