"""One self-contained HTML page from a report: `analyze --html` and pytest `--tokenwise-html`.

No network: CSS and the table's sort/filter script are inline, heatmaps are embedded as
base64 PNGs (report/plots.py; left out with a note when matplotlib is missing). The table has
one row per case (`<tr data-case="<case id>">`), each number cell carrying its exact value in
`data-v` (Python's repr, empty for null) so a click on a header sorts by value and tests can
compare the page with the JSON report.

Rows come from the report's `cases` (pytest reports: verdict, limits and baseline per case;
metrics from the case entry when present, else from by_layer) or, for a plain eval report,
from by_layer (verdict "not gated"). A case "regressed" when its verdict is failed; cells over
their limit or worse than their baseline are marked too.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenwise_harness.atomic import write_text_atomic
from tokenwise_harness.report.document import iter_metrics
from tokenwise_harness.text import plural

NOT_GATED = "not gated"
COLUMNS = (
    # (header, key, kind): kind "text" or "num"
    ("case", "case_id", "text"), ("layer", "layer", "num"), ("proj", "proj", "text"),
    ("config", "config", "text"), ("verdict", "verdict", "text"), ("nmse", "nmse", "num"),
    ("nmse limit", "nmse_limit", "num"), ("nmse baseline", "nmse_baseline", "num"),
    ("change vs baseline", "change", "num"), ("sqnr_db", "sqnr_db", "num"),
    ("token_rel_l2_max", "rel_max", "num"), ("rel_l2_max limit", "rel_max_limit", "num"),
)

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.4em 0 .4em}
.meta{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.92em}
.meta dt{color:#666} .meta dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
.counts span{display:inline-block;margin-right:1.2em;font-weight:600}
.counts .failed{color:#b00020} .counts .passed{color:#1b5e20}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}
table{border-collapse:collapse;font-size:.88em;margin-top:.5em}
th,td{padding:.2em .55em;border-bottom:1px solid #e4e4e4;white-space:nowrap}
th{position:sticky;top:0;background:#f3f3f3;cursor:pointer;user-select:none;text-align:left}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.failed td{background:#fde7e9} tr.failed td.verdict{color:#b00020;font-weight:700}
tr.nobaseline td.verdict{color:#8a6d00;font-weight:700}
td.over{color:#b00020;font-weight:700} td.worse{color:#b35c00} td.better{color:#1b5e20}
.controls{margin:.6em 0} .controls input[type=search]{width:22em}
.note{color:#666;font-size:.9em}
"""

SCRIPT = """
(function(){
  var table=document.getElementById('cases'), body=table.tBodies[0];
  function key(td){var v=td.getAttribute('data-v'); if(v===null||v==='') return null;
    var n=Number(v); return td.classList.contains('num')&&!isNaN(n)?n:v.toLowerCase();}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
        if(x===null&&y===null) return 0; if(x===null) return 1; if(y===null) return -1;
        var c=x<y?-1:x>y?1:0; return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  var q=document.getElementById('filter'), only=document.getElementById('onlyfailed');
  function filter(){var t=q.value.toLowerCase(), f=only.checked, shown=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var ok=(!t||r.getAttribute('data-case').toLowerCase().indexOf(t)>=0)&&(!f||r.classList.contains('failed'));
      r.style.display=ok?'':'none'; if(ok) shown++;});
    document.getElementById('shown').textContent=shown;}
  q.addEventListener('input',filter); only.addEventListener('change',filter);
})();
"""


# ---------------------------------------------------------------- rows

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _limit(limits: Any, metric: str) -> float | None:
    entry = limits.get(metric) if isinstance(limits, Mapping) else None
    return _num(entry.get("limit")) if isinstance(entry, Mapping) else _num(entry)


def case_rows(report: Mapping) -> list[dict]:
    """One dict per case (keys: the COLUMNS keys, plus block, smooth, limit rules), in case order."""
    from tokenwise_harness.grid import parse_key
    from tokenwise_harness.verdict.cases import Case, parse_case_id

    by_case = {(layer, block, proj, cfg): m for layer, block, proj, cfg, m in iter_metrics(report)}
    rows = []
    cases = report.get("cases")
    if isinstance(cases, Mapping) and cases:
        for cid, entry in cases.items():
            case = parse_case_id(cid)
            if case is None or not isinstance(entry, Mapping):
                continue
            metrics = entry.get("metrics")
            if not isinstance(metrics, Mapping):
                metrics = by_case.get((case.layer, case.block, case.proj, entry.get("config", case.cfg.key)), {})
            rows.append(_row(cid, case, entry.get("verdict", "?"), metrics, entry.get("limits"), entry.get("baseline")))
        rows.sort(key=lambda r: r["_sort"])
        return rows
    smooth = bool(report.get("meta", {}).get("smooth"))
    for (layer, block, proj, cfg), metrics in by_case.items():
        try:
            case = Case(layer, block, proj, parse_key(cfg), smooth)
        except Exception:  # noqa: BLE001 - a hand-made key the harness cannot name: shown as is
            case = None
        cid = case.case_id if case is not None else f"layer{layer}-{block}-{proj}-{cfg}"
        row = _row(cid, case, NOT_GATED, metrics, None, None)
        row.update(layer=layer, block=block, proj=proj, config=cfg)
        rows.append(row)
    return rows


def _row(cid: str, case, verdict: str, metrics: Mapping, limits: Any, baseline: Any) -> dict:
    nmse = _num(metrics.get("nmse"))
    base = _num(baseline.get("nmse")) if isinstance(baseline, Mapping) else None
    change = nmse / base - 1.0 if nmse is not None and base not in (None, 0.0) else None
    return {
        "case_id": cid, "layer": case.layer if case else None, "block": case.block if case else "",
        "proj": case.proj if case else "", "config": case.cfg.key if case else "",
        "smooth": bool(case and case.smooth), "verdict": str(verdict), "nmse": nmse,
        "nmse_limit": _limit(limits, "nmse"), "nmse_baseline": base, "change": change,
        "sqnr_db": _num(metrics.get("sqnr_db")), "rel_max": _num(metrics.get("token_rel_l2_max")),
        "rel_max_limit": _limit(limits, "token_rel_l2_max"),
        "_sort": case.sort_key() if case else (math.inf,),
    }


# ---------------------------------------------------------------- page

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "change":
        return f"{100 * value:+.2f}%"
    if key == "sqnr_db":
        return f"{value:.2f}"
    if key == "layer":
        return str(value)
    return f"{value:.4e}"


def _cell(key: str, kind: str, row: dict) -> str:
    value = row[key]
    classes = [kind] if kind == "num" else []
    if key == "verdict":
        classes.append("verdict")
    limit_of = {"nmse": "nmse_limit", "rel_max": "rel_max_limit"}
    if key in limit_of and value is not None and row[limit_of[key]] is not None and value > row[limit_of[key]]:
        classes.append("over")
    if key == "change" and value is not None:
        classes.append("worse" if value > 0 else "better" if value < 0 else "")
    data = "" if value is None else repr(value) if isinstance(value, float) else str(value)
    text = _fmt(key, value) if kind == "num" else str(value)
    cls = " ".join(c for c in classes if c)
    return f'<td{f" class={chr(34)}{cls}{chr(34)}" if cls else ""} data-v="{_e(data)}">{_e(text)}</td>'


def _meta_items(report: Mapping, source: str | None, extra: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    meta = report.get("meta", {})
    xy_meta = meta.get("xy_meta") if isinstance(meta.get("xy_meta"), Mapping) else {}
    items = []
    if source:
        items.append(("report", source))
    if meta.get("model_dir"):
        fp = str(meta.get("model_fingerprint") or "")
        items.append(("model", f"{meta['model_dir']}" + (f" (fingerprint {fp[:12]})" if fp else "")))
    if meta.get("xy_path"):
        tokens = xy_meta.get("n_tokens")
        items.append(("cache", f"{meta['xy_path']}" + (f" ({tokens} tokens)" if tokens else "")))
    items.append(("grid", f"{plural(len(meta.get('configs') or []), 'config')}, grid_mode {meta.get('grid_mode')}, "
                          f"smooth {str(meta.get('smooth')).lower()}"))
    if meta.get("quantizer"):
        items.append(("quantizer", str(meta["quantizer"])))
    for k, v in (extra or {}).items():
        items.append((str(k), str(v)))
    return items


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def heatmap_images(report: Mapping, vlim=None, label: str | None = None,
                   compare: tuple[Mapping, str, str] | None = None) -> tuple[list[tuple[str, bytes]], str | None]:
    """([(caption, png)], note): the report's heatmap and (compare=(other report, base label,
    other label)) the delta heatmap; note says why there are none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "heatmaps left out: matplotlib is not installed (pip install 'tokenwise-harness[plots]')"
    from tokenwise_harness.report import plots

    images = []
    fig = plots.heatmap_figure(report, vlim=vlim, label=label)
    if fig is not None:
        images.append(("log10(nmse) per layer and projection", plots.png_bytes(fig)))
    if compare is not None:
        other, base_label, other_label = compare
        delta = plots.delta_figure(report, other, base_label, other_label)
        if delta is not None:
            images.append((f"change, {other_label} vs {base_label}", plots.png_bytes(delta)))
    return images, None if images else "no heatmap: no case has a finite, non-zero nmse"


def render_html(report: Mapping, title: str = "tokenwise precision report", source: str | None = None,
                vlim=None, label: str | None = None, extra_meta: Mapping[str, Any] | None = None,
                compare: tuple[Mapping, str, str] | None = None) -> str:
    """The page as a string (see the module doc)."""
    rows = case_rows(report)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    images, note = heatmap_images(report, vlim, label, compare)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>", '<dl class="meta">']
    for k, v in _meta_items(report, source, extra_meta):
        out.append(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>")
    out.append("</dl>")
    out.append('<p class="counts">' + f"<span>{len(rows)} case{'s' if len(rows) != 1 else ''}</span>"
               + "".join(f'<span class="{_e(v.replace(" ", ""))}">{n} {_e(v)}</span>' for v, n in sorted(counts.items()))
               + "</p>")
    out.append("<h2>Heatmaps</h2>")
    out += [f"<figure>{_img(png, cap)}<figcaption class=note>{_e(cap)}</figcaption></figure>" for cap, png in images]
    if note:
        out.append(f'<p class="note">{_e(note)}</p>')
    out.append("<h2>Cases</h2>")
    out.append('<div class="controls"><input type="search" id="filter" placeholder="filter by case id (e.g. q_proj)"> '
               '<label><input type="checkbox" id="onlyfailed"> only failed</label> '
               f'<span class="note"><span id="shown">{len(rows)}</span> shown; click a header to sort</span></div>')
    out.append('<table id="cases" class="sortable"><thead><tr>'
               + "".join(f'<th class="{kind}" scope="col">{_e(h)}</th>' for h, _k, kind in COLUMNS)
               + "</tr></thead><tbody>")
    for r in rows:
        cls = "failed" if r["verdict"] == "failed" else "nobaseline" if r["verdict"] == "no baseline" else ""
        out.append(f'<tr data-case="{_e(r["case_id"])}"' + (f' class="{cls}"' if cls else "") + ">"
                   + "".join(_cell(k, kind, r) for _h, k, kind in COLUMNS) + "</tr>")
    out.append(f"</tbody></table><script>{SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


def write_html(report: Mapping, path: Path, flag: str, **kw) -> Path:
    """render_html(report, **kw) written atomically to path."""
    write_text_atomic(Path(path), render_html(report, **kw), flag)
    return Path(path)
