"""The demo job end to end on the random-weight demo model (small sizes, ~30 s on 2 cores):
progress on every long step, plurals, SUMMARY.md's run-time total, heatmaps on one color
scale plus the delta heatmap, the HTML report, and a gate.sh that works from anywhere and
after the output dir moves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tokenwise_harness.report import plots


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(out dir, paths, log lines, stderr) of one demo run with progress bars on."""
    import contextlib
    import io

    import torch

    from tokenwise_harness.demo.job import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    logs: list[str] = []
    err = io.StringIO()
    before = torch.get_num_threads()
    with contextlib.redirect_stderr(err):
        paths = run_demo(out, model="random", ranks="8,16", qspecs="nvfp4@16", grid_mode="combined", cn=2, eu=2,
                         length=32, threads=1, log=logs.append, progress=True)
    assert torch.get_num_threads() == before
    return out, paths, logs, err.getvalue()


def test_progress_bar_on_every_long_step(demo):
    _out, _paths, _logs, err = demo
    for desc in ("save_xy", "eval", "demo: harness", "demo: analyze", "demo: outlier ratios"):
        assert re.search(rf"{re.escape(desc)}: +100%\|", err), (desc, err[-2000:])
    # the harness bar counted every case (28 projections x 1 config)
    assert re.search(r"demo: harness: 100%\|[^\n\r]*\| 28/28", err), err[-2000:]


def test_plurals(demo):
    _out, _paths, logs, _err = demo
    text = "\n".join(logs)
    assert "2+2 samples x 32 tokens" in text and "(2 configs)" in text
    assert not re.search(r"\b1 (configs|samples|tokens|projections|cases)\b", text), text
    from tokenwise_harness.text import plural

    assert (plural(1, "config"), plural(2, "config"), plural(0, "case")) == ("1 config", "2 configs", "0 cases")


def test_summary_total_is_the_sum_of_its_rows(demo):
    out, paths, logs, _err = demo
    summary = (out / "SUMMARY.md").read_text()
    line = next(line for line in summary.splitlines() if line.startswith("Run time of this run:"))
    rows = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+) s", line.split("·")[0]))
    total = int(re.search(r"total (\d+) s", line)[1])
    assert set(rows) == {"model", "save_xy", "eval_fake", "smooth", "eval_smooth", "harness", "analyze", "summary"}
    assert total == sum(rows.values())
    assert f"done in {total} s" in logs[-1]
    assert "1 CPU cores" not in summary


def test_heatmaps_share_one_scale_and_the_delta_is_drawn(demo):
    out, paths, _logs, _err = demo
    from tokenwise_harness.report import document as rp

    a, b = out / "analysis" / "nocalib" / "heatmap.png", out / "analysis" / "smooth" / "heatmap.png"
    scale_a = plots.png_text(a.read_bytes())[plots.COLOR_SCALE_KEY]
    scale_b = plots.png_text(b.read_bytes())[plots.COLOR_SCALE_KEY]
    vmin, vmax = plots.color_limits(rp.load_report(paths["report_nocalib"]), rp.load_report(paths["report_smooth"]))
    assert scale_a == scale_b == f"{vmin!r} {vmax!r}"
    lo, hi = map(float, plots.png_text(paths["analysis_delta"].read_bytes())[plots.COLOR_SCALE_KEY].split())
    assert lo == -hi and hi > 0  # diverging, centred at 0


def test_html_report_holds_both_heatmaps_and_every_case(demo):
    out, paths, _logs, _err = demo
    from tests.test_html import Page

    page = Page(paths["analysis_html"].read_text(encoding="utf-8"))
    assert len(page.images) == 2 and page.external == []
    n_cases = sum(len(cfgs) for by_block in json.loads(paths["report_nocalib"].read_text())["by_layer"].values()
                  for block in by_block.values() for cfgs in block["by_proj"].values())
    assert len(page.rows) == n_cases == 28 * 2


def test_gate_sh_is_relative_and_runs_from_anywhere_after_a_move(demo, tmp_path):
    out, _paths, _logs, _err = demo
    gate = (out / "harness" / "gate.sh").read_text()
    assert str(out) not in gate and 'cd "$(dirname "$0")"' in gate
    assert "--model-dir=../model-qwen3" in gate and "--xy-path=../cache_xy/demo.safetensors" in gate
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(["sh", str(moved / "harness" / "gate.sh")], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "28 passed" in proc.stdout
    assert json.loads((moved / "harness" / "report.json").read_text())["meta"]["model_dir"] == "../model-qwen3"
