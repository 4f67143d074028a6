"""Heatmaps of reports: log10(nmse) per layer x projection, one panel per config, and the
change between two reports (log10 of their nmse ratio). Used by `analyze`, the HTML report
and the demo.

Color scale. `color_limits(*reports)` gives one scale for several reports so their pictures
compare (one color = one error everywhere): the top is the largest log10(nmse) over all of
them, the bottom the smallest but at most LOG_SPAN decades below the top (exact cases, e.g.
a rank at or above the weight's size, reach 1e-16 and would squash every real difference
into one color); cells under the bottom take the lowest color and the colorbar gets an arrow.
The scale used is stored in each PNG as the text chunk `tokenwise:color_scale`.

Panels: one per config that has at least one finite, non-zero nmse (an all-gray panel says
nothing; the title lists the configs left out), at most MAX_PANELS; every layer is labelled.
The delta heatmap uses a diverging colormap centred at 0 (blue: the second report has less
error), limits symmetric around 0.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.atomic import atomic_path
from tokenwise_harness.report.document import iter_metrics, report_configs

MAX_PANELS = 12
ANNOTATE_MAX_LAYERS = 8  # cells carry their value up to this many layers
LOG_SPAN = 8.0  # decades below the worst case that the color scale spans at most
MAX_PIXELS = 3000  # the taller / wider side of a PNG, at most
COLOR_SCALE_KEY = "tokenwise:color_scale"
NMSE_LABEL = "log10(nmse)  (higher = more error)"


def matplotlib_available(what: str) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(f"{what}: matplotlib is not installed, heatmaps skipped; "
                      "pip install 'tokenwise-harness[plots]'", stacklevel=3)
        return False
    return True


# ---------------------------------------------------------------- data

def grid_values(report: Mapping, cfgs: list[str]) -> tuple[list[int], dict]:
    """Layers present and {cfg: rows x 7 of log10(nmse) or None (missing, zero, null)}."""
    cases = list(iter_metrics(report))
    layers = sorted({c[0] for c in cases})
    grids = {cfg: [[None] * len(PROJ_ORDER) for _ in layers] for cfg in cfgs}
    for layer, _block, proj, cfg, m in cases:
        if cfg in grids and m["nmse"] is not None and m["nmse"] > 0:
            grids[cfg][layers.index(layer)][PROJ_ORDER.index(proj)] = math.log10(m["nmse"])
    return layers, grids


def _values(grids: Mapping) -> list[float]:
    return [v for g in grids.values() for row in g for v in row if v is not None]


def color_limits(*reports: Mapping) -> tuple[float, float]:
    """(vmin, vmax) of log10(nmse) shared by the reports (see the module doc)."""
    values: list[float] = []
    for report in reports:
        values += _values(grid_values(report, report_configs(report))[1])
    if not values:
        return -1.0, 0.0
    lo, hi = min(values), max(values)
    lo = max(lo, hi - LOG_SPAN)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def panel_configs(report: Mapping, max_panels: int = MAX_PANELS) -> tuple[list[str], list[str], int]:
    """(configs drawn, configs left out for having no data, number of configs in the report)."""
    cfgs = report_configs(report)
    _layers, grids = grid_values(report, cfgs)
    with_data = [c for c in cfgs if any(v is not None for row in grids[c] for v in row)]
    return with_data[:max_panels], [c for c in cfgs if c not in with_data], len(cfgs)


def delta_values(base: Mapping, other: Mapping) -> tuple[list[int], list[str], dict]:
    """(layers, configs in both, {cfg: rows x 7 of log10(nmse_other / nmse_base) or None})."""
    cfgs = [c for c in report_configs(base) if c in set(report_configs(other))]
    layers_b, gb = grid_values(base, cfgs)
    layers_o, go = grid_values(other, cfgs)
    layers = sorted(set(layers_b) & set(layers_o))
    grids = {}
    for cfg in cfgs:
        rows = []
        for layer in layers:
            b, o = gb[cfg][layers_b.index(layer)], go[cfg][layers_o.index(layer)]
            rows.append([None if x is None or y is None else y - x for x, y in zip(b, o)])
        grids[cfg] = rows
    cfgs = [c for c in cfgs if any(v is not None for row in grids[c] for v in row)]
    return layers, cfgs, grids


# ---------------------------------------------------------------- figures

def _layout(n_panels: int, n_layers: int) -> tuple[int, int, float, float]:
    """(nrows, ncols, panel width, panel height) in inches; ~0.2 in per layer row."""
    ncols = min(n_panels, 4)
    nrows = math.ceil(n_panels / ncols)
    return nrows, ncols, 3.0, max(2.4, 0.9 + 0.2 * n_layers)


def _new_figure(n_panels: int, n_layers: int):
    from matplotlib.figure import Figure

    nrows, ncols, w, h = _layout(n_panels, n_layers)
    fig = Figure(figsize=(1.2 + w * ncols, 1.0 + h * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)  # no empty panels
    return fig, axes[:n_panels], h


def _style_panel(ax, cfg: str, layers: list[int], panel_h: float) -> None:
    per_layer_in = (panel_h - 0.9) / max(1, len(layers))
    size = max(4.0, min(8.0, per_layer_in * 72 * 0.75))
    ax.set_title(cfg, fontsize=9)
    ax.set_xticks(range(len(PROJ_ORDER)))
    ax.set_xticklabels([p.removesuffix("_proj") for p in PROJ_ORDER], fontsize=8)
    ax.set_yticks(range(len(layers)))  # every layer labelled
    ax.set_yticklabels([str(layer) for layer in layers], fontsize=size)
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel("layer", fontsize=8)
    ax.axvline(3.5, color="white", linewidth=2)  # self_attn | mlp


def _annotate(ax, grid, text, dark) -> None:
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            if value is not None:
                ax.text(col, row, text(value), ha="center", va="center", fontsize=6,
                        color="white" if dark(value) else "black")


def heatmap_figure(report: Mapping, vlim: tuple[float, float] | None = None, max_panels: int = MAX_PANELS,
                   label: str | None = None):
    """The log10(nmse) heatmap of a report (None when it has no data); vlim: a shared scale."""
    import numpy as np
    from matplotlib import colormaps

    cfgs, empty, total = panel_configs(report, max_panels)
    if not cfgs:
        return None
    layers, grids = grid_values(report, cfgs)
    vmin, vmax = vlim if vlim is not None else color_limits(report)
    fig, axes, panel_h = _new_figure(len(cfgs), len(layers))
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = None
    for ax, cfg in zip(axes, cfgs):
        data = np.ma.masked_invalid(np.array(grids[cfg], dtype=float))
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        _style_panel(ax, cfg, layers, panel_h)
        if len(layers) <= ANNOTATE_MAX_LAYERS:
            mid = (vmin + vmax) / 2
            _annotate(ax, grids[cfg], lambda v: f"{10 ** v:.1e}", lambda v, mid=mid: v < mid)
    below = any(v < vmin for v in _values({c: grids[c] for c in cfgs}))
    fig.colorbar(image, ax=axes, label=NMSE_LABEL, shrink=0.7, aspect=35, extend="min" if below else "neither")
    fig.suptitle(_title(report, label, len(cfgs), total, empty), fontsize=11)
    fig._tokenwise_scale = (vmin, vmax)
    return fig


def _title(report: Mapping, label: str | None, shown: int, total: int, empty: list[str]) -> str:
    meta = report["meta"]
    title = (f"{label or 'NMSE per projection'} (color: log10, one scale) · cache "
             f"{os.path.basename(str(meta.get('xy_path', '')))} · smooth={str(meta.get('smooth')).lower()}")
    note = "\ngray: no data, or nmse zero / not finite"
    if empty:
        note += f" · not drawn (no data): {', '.join(empty)}"
    if shown + len(empty) < total:
        note += f" · showing {shown} of {total} configs (all are in the rankings)"
    return title + note


def delta_figure(base: Mapping, other: Mapping, base_label: str, other_label: str, max_panels: int = MAX_PANELS):
    """log10(nmse_other / nmse_base) per cell, diverging colors centred at 0 (None: nothing shared)."""
    import numpy as np
    from matplotlib import colormaps

    layers, cfgs, grids = delta_values(base, other)
    if not cfgs:
        return None
    total = len(cfgs)
    cfgs = cfgs[:max_panels]
    values = _values({c: grids[c] for c in cfgs})
    bound = max(0.1, max(abs(v) for v in values))
    fig, axes, panel_h = _new_figure(len(cfgs), len(layers))
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")
    image = None
    for ax, cfg in zip(axes, cfgs):
        data = np.ma.masked_invalid(np.array(grids[cfg], dtype=float))
        image = ax.imshow(data, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        _style_panel(ax, cfg, layers, panel_h)
        if len(layers) <= ANNOTATE_MAX_LAYERS:
            _annotate(ax, grids[cfg], lambda v: f"x{10 ** v:.2g}", lambda v: abs(v) > bound * 0.6)
    fig.colorbar(image, ax=axes, label=f"log10(nmse {other_label} / nmse {base_label})", shrink=0.7, aspect=35)
    better = sum(1 for v in values if v < 0)
    note = f" · showing {len(cfgs)} of {total} configs" if len(cfgs) < total else ""
    fig.suptitle(f"Change in nmse, {other_label} vs {base_label}: blue = {other_label} has less error "
                 f"({better} of {len(values)} cells){note}\ngray: no data in one of the two", fontsize=11)
    fig._tokenwise_scale = (-bound, bound)
    return fig


# ---------------------------------------------------------------- output

def png_bytes(fig, dpi: int = 120) -> bytes:
    """The figure as PNG, its color scale in the `tokenwise:color_scale` text chunk."""
    width, height = fig.get_size_inches()
    dpi = max(40, min(dpi, int(MAX_PIXELS / max(width, height))))
    vmin, vmax = getattr(fig, "_tokenwise_scale", (math.nan, math.nan))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={COLOR_SCALE_KEY: f"{vmin!r} {vmax!r}"})
    return buf.getvalue()


def write_png(fig, path: Path, flag: str) -> Path:
    data = png_bytes(fig)
    with atomic_path(path, flag) as tmp:
        Path(tmp).write_bytes(data)
    return path


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (to read the color scale back)."""
    import struct

    out, pos = {}, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    return out
