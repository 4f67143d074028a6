"""report/html.py: the self-contained HTML report (analyze --html; pytest --tokenwise-html in
test_plugin.py), checked by parsing it against the JSON report, and in a headless browser
when one is installed."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from tests.helpers import run_cli
from tests.test_analyze import CFGS, make_report
from tokenwise_harness.report import document as rp
from tokenwise_harness.report import html as rh


class Page(HTMLParser):
    """Rows of the cases table ({case id: {column key: (data-v, text, classes)}}), images, links."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: dict = {}
        self.row_classes: dict = {}
        self.headers: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._row = self._cell = None
        self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag == "link":
            self.external.append(str(a))
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(a["src"])
        if tag == "th":
            self._in_th = True
            self.headers.append("")
        if tag == "tr" and "data-case" in a:
            self._row = a["data-case"]
            self.rows[self._row] = []
            self.row_classes[self._row] = a.get("class", "")
        if tag == "td" and self._row is not None:
            self._cell = [a.get("data-v"), "", a.get("class", "")]

    def handle_data(self, data):
        if self._in_th:
            self.headers[-1] += data
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False
        if tag == "td" and self._cell is not None:
            self.rows[self._row].append(tuple(self._cell))
            self._cell = None
        if tag == "tr":
            self._row = None

    def column(self, case_id: str, key: str):
        keys = [k for _h, k, _kind in rh.COLUMNS]
        return self.rows[case_id][keys.index(key)]


def _value(data_v):
    return None if data_v == "" else float(data_v)


def test_analyze_html_every_case_matches_the_json(tmp_path):
    report = make_report(n_layers=3)
    path = rp.write_report(report, tmp_path / "r.json")
    proc = run_cli("analyze", "--report", path, "--out_dir", tmp_path / "a", "--html")
    assert proc.returncode == 0, proc.stderr
    page = Page((tmp_path / "a" / "report.html").read_text(encoding="utf-8"))
    loaded = json.loads(path.read_text())
    expected = {}
    for layer, block, proj, cfg, m in rp.iter_metrics(loaded):
        expected[(layer, proj, cfg)] = m
    assert len(page.rows) == len(expected) == 3 * 7 * len(CFGS)
    for cid in page.rows:
        layer, proj, cfg = int(page.column(cid, "layer")[0]), page.column(cid, "proj")[0], page.column(cid, "config")[0]
        m = expected[(layer, proj, cfg)]
        assert _value(page.column(cid, "nmse")[0]) == m["nmse"]  # exact: repr round-trips
        assert _value(page.column(cid, "sqnr_db")[0]) == m["sqnr_db"]
        assert _value(page.column(cid, "rel_max")[0]) == m["token_rel_l2_max"]
        assert page.column(cid, "verdict")[1] == rh.NOT_GATED
    assert [h for h in page.headers] == [h for h, _k, _kind in rh.COLUMNS]
    # self-contained: the heatmap is an embedded PNG, nothing is fetched
    assert page.external == [] and page.scripts == 1
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def gated_report():
    """A pytest-style report: cases with verdict, limits and baselines (one regressed, one
    over its limit, one without a baseline)."""
    report = make_report(n_layers=2, cfgs=CFGS[:2])
    cases = {}
    for layer, block, proj, cfg, m in rp.iter_metrics(report):
        from tokenwise_harness.grid import parse_key
        from tokenwise_harness.verdict.cases import Case

        cid = Case(layer, block, proj, parse_key(cfg)).case_id
        cases[cid] = {"config": cfg, "smooth": False, "verdict": "passed",
                      "limits": {"nmse": {"limit": 0.05, "rule": "defaults"},
                                 "token_rel_l2_max": {"limit": 2.0, "rule": "defaults"}},
                      "baseline": dict(m)}
    regressed = "layer1-mlp-up_proj-rank16-nvfp4-blk128"
    m = report["by_layer"]["1"]["mlp"]["by_proj"]["up_proj"][CFGS[0]]
    cases[regressed]["baseline"]["nmse"] = m["nmse"] / 2
    cases[regressed]["verdict"] = "failed"
    nobase = "layer0-self_attn-q_proj-rank32-nvfp4-blk128"
    cases[nobase]["baseline"] = None
    cases[nobase]["verdict"] = "no baseline"
    report["cases"] = cases
    return report, regressed, nobase, m["nmse"]


def test_gated_report_shows_verdict_limit_baseline_and_marks_regressions(tmp_path):
    report, regressed, nobase, nmse = gated_report()
    path = rh.write_html(report, tmp_path / "r.html", "--tokenwise-html", source="r.json")
    page = Page(path.read_text(encoding="utf-8"))
    assert sorted(page.rows) == sorted(report["cases"])
    for cid, entry in report["cases"].items():
        assert page.column(cid, "verdict")[1] == entry["verdict"]
        assert _value(page.column(cid, "nmse_limit")[0]) == 0.05
        assert _value(page.column(cid, "rel_max_limit")[0]) == 2.0
        base = entry["baseline"]["nmse"] if entry["baseline"] else None
        assert (_value(page.column(cid, "nmse_baseline")[0]) if base is not None else None) == base
    assert page.row_classes[regressed] == "failed"
    assert page.row_classes[nobase] == "nobaseline"
    assert [cid for cid, c in page.row_classes.items() if c == "failed"] == [regressed]
    change = page.column(regressed, "change")
    assert _value(change[0]) == pytest.approx(1.0) and change[1] == "+100.00%" and "worse" in change[2]
    assert page.column(nobase, "change")[1] == "—"
    # an nmse over its limit is marked in its cell
    report["cases"][regressed]["limits"]["nmse"]["limit"] = nmse / 10
    page = Page(rh.render_html(report))
    assert "over" in page.column(regressed, "nmse")[2]
    assert not any("over" in page.column(c, "nmse")[2] for c in page.rows if c != regressed)


def test_html_without_cases_in_by_layer_uses_case_metrics(tmp_path):
    """Smoothed cases of a two-model pytest run are not in by_layer: their metrics come from
    the case entry."""
    report, *_ = gated_report()
    cid = "layer0-mlp-down_proj-rank16-nvfp4-blk128-smooth"
    report["cases"][cid] = {"config": CFGS[0], "smooth": True, "verdict": "passed", "limits": {},
                            "baseline": None, "metrics": {"nmse": 0.125, "sqnr_db": 9.03, "token_rel_l2_max": 0.5}}
    page = Page(rh.render_html(report))
    assert _value(page.column(cid, "nmse")[0]) == 0.125


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_in_a_headless_browser(tmp_path):
    """The page loads and its script runs: a click on the nmse header sorts the rows."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)})")
    report, *_ = gated_report()
    text = rh.render_html(report)
    probe = ("<script>var th=document.querySelectorAll('#cases th')[5]; th.click();"
             "document.body.setAttribute('data-order', Array.prototype.map.call("
             "document.querySelectorAll('#cases tbody tr'), function(r){return r.cells[5].getAttribute('data-v');})"
             ".join(','));</script></body>")
    page = tmp_path / "page.html"
    page.write_text(text.replace("</body>", probe), encoding="utf-8")
    proc = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    order = proc.stdout.split('data-order="', 1)[1].split('"', 1)[0].split(",")
    values = [float(v) for v in order if v]
    assert len(values) == len(report["cases"]) and values == sorted(values)
    assert not any(math.isnan(v) for v in values)
