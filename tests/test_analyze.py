"""analyze.py: rankings as CSV and Markdown, the heatmap, bad reports."""

from __future__ import annotations

import csv
import math
import random
import struct

import pytest

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.report import analyze as an
from tokenwise_harness.report import document as rp
from tokenwise_harness.report import plots

BLOCKS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
BLOCK_OF = {p: b for b, projs in BLOCKS.items() for p in projs}
CFGS = ["rank=16;fmt=nvfp4;blk=128", "rank=32;fmt=nvfp4;blk=128", "rank=0;fmt=nvfp4;blk=128",
        "rank=16;fmt=none;blk=none"]


def metrics(nmse, rel_max):
    return {"nmse": nmse, "token_l2_mean": 1.0, "token_l2_max": 3.0, "token_rel_l2_mean": 0.1,
            "token_rel_l2_max": rel_max, "sse": 1.0, "denom": 2.0, "n_tokens": 128}


def make_report(n_layers=5, cfgs=CFGS, seed=0, ties=False):
    rng = random.Random(seed)
    results = {}
    for layer in range(n_layers):
        for proj in PROJ_ORDER:
            per_cfg = {}
            for cfg in cfgs:
                nmse = 1e-3 if ties else 10 ** rng.uniform(-5, -1)
                per_cfg[cfg] = metrics(nmse, rng.uniform(0.01, 1.0))
            results[(layer, BLOCK_OF[proj], proj)] = per_cfg
    meta = {"xy_path": "/data/cache_xy/qwen3_veri128.safetensors", "xy_meta": {"seed": "0"},
            "grid_mode": "full", "ranks": [16, 32], "qspecs": [["nvfp4", "128"]], "smooth": False,
            "chunk_tokens": 4096, "configs": list(cfgs)}
    return rp.build_report(meta, results)


@pytest.fixture
def report_path(tmp_path):
    return rp.write_report(make_report(), tmp_path / "report.json")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs_exist(report_path, tmp_path):
    out = tmp_path / "out" / "nested"
    paths = an.analyze(report_path, out)
    names = sorted(p.name for p in paths)
    assert names == ["heatmap.png", "ranking1.csv", "ranking1.md", "ranking2.csv", "ranking2.md"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(p.name for p in out.iterdir()) == names  # no temp files left


def test_ranking2_sorted_against_independent_sort(report_path, tmp_path):
    an.analyze(report_path, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "ranking2.csv")
    report = rp.load_report(report_path)
    for cfg in CFGS:
        expected = []
        for layer, blocks in report["by_layer"].items():
            for block, body in blocks.items():
                for proj, per_cfg in body["by_proj"].items():
                    expected.append((per_cfg[cfg]["nmse"], int(layer), block, proj))
        expected.sort(key=lambda e: -e[0])
        got = [(float(r["nmse"]), int(r["layer"]), r["block"], r["proj"]) for r in rows if r["config"] == cfg]
        assert got == expected  # full-precision floats survive the CSV
        assert [int(r["rank"]) for r in rows if r["config"] == cfg] == list(range(1, len(expected) + 1))
    assert [r["config"] for r in rows][:: 5 * 7] == CFGS  # configs grouped, in grid order


def test_ranking1_sorted_by_mean_and_by_max(report_path, tmp_path):
    an.analyze(report_path, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "ranking1.csv")
    report = rp.load_report(report_path)
    for cfg in CFGS:
        for order_by in ("nmse_mean_over_proj", "nmse_max_over_proj"):
            expected = sorted(
                ((body["agg"][cfg][order_by], int(layer), block)
                 for layer, blocks in report["by_layer"].items() for block, body in blocks.items()),
                key=lambda e: -e[0])
            got = [(float(r[order_by]), int(r["layer"]), r["block"]) for r in rows
                   if r["config"] == cfg and r["order_by"] == order_by]
            assert got == expected


def test_ranking1_worst_proj_and_rel_max(tmp_path):
    report = make_report(n_layers=2)
    rows = an.ranking1(report)
    for row in rows:
        projs = report["by_layer"][str(row["layer"])][row["block"]]["by_proj"]
        cases = {p: m[row["config"]] for p, m in projs.items()}
        worst = max(cases, key=lambda p: cases[p]["nmse"])
        assert row["worst_proj"] == worst
        assert row["nmse_max_over_proj"] == cases[worst]["nmse"]
        assert row["token_rel_l2_max"] == max(m["token_rel_l2_max"] for m in cases.values())


def test_ties_keep_forward_order():
    rows = an.ranking2(make_report(n_layers=2, cfgs=CFGS[:1], ties=True))
    assert [(r["layer"], r["proj"]) for r in rows] == [(l, p) for l in range(2) for p in PROJ_ORDER]


def test_null_nmse_ranks_first(tmp_path):
    report = make_report(n_layers=3, cfgs=CFGS[:1])
    report["by_layer"]["2"]["mlp"]["by_proj"]["up_proj"][CFGS[0]]["nmse"] = None
    report["by_layer"]["2"]["mlp"]["agg"][CFGS[0]].update(nmse_mean_over_proj=None, nmse_max_over_proj=None)
    path = rp.write_report(report, tmp_path / "r.json")
    an.analyze(path, tmp_path / "out")
    first = read_csv(tmp_path / "out" / "ranking2.csv")[0]
    assert (first["layer"], first["proj"], first["nmse"]) == ("2", "up_proj", "")
    assert read_csv(tmp_path / "out" / "ranking1.csv")[0]["layer"] == "2"
    assert "n/a" in (tmp_path / "out" / "ranking2.md").read_text()


def test_markdown_tables(report_path, tmp_path):
    an.analyze(report_path, tmp_path / "out")
    for name, header in (("ranking1.md", "| rank | layer | block | nmse mean |"),
                         ("ranking2.md", "| rank | layer | block | proj | nmse |")):
        text = (tmp_path / "out" / name).read_text()
        lines = text.splitlines()
        assert lines[0].startswith("# Ranking-")
        header_at = [i for i, line in enumerate(lines) if line.startswith(header)]
        assert header_at and all(lines[i + 1].startswith("|--") for i in header_at)
        for cfg in CFGS:
            assert f"`{cfg}`" in text
        assert "qwen3_veri128.safetensors" in text


def test_markdown_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(an, "MD_MAX_ROWS", 10)
    path = rp.write_report(make_report(n_layers=3, cfgs=CFGS[:1]), tmp_path / "r.json")
    an.analyze(path, tmp_path / "out")
    text = (tmp_path / "out" / "ranking2.md").read_text()
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 10
    assert "11 less sensitive rows not shown" in text
    assert len(read_csv(tmp_path / "out" / "ranking2.csv")) == 21


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_heatmap_is_a_sensible_png(report_path, tmp_path):
    an.analyze(report_path, tmp_path / "out")
    width, height = png_size(tmp_path / "out" / "heatmap.png")
    assert 400 <= width <= 3000 and 250 <= height <= 3000


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_title()]  # the colorbar's axes has no title


def test_heatmap_caps_panels(tmp_path):
    cfgs = [f"rank={r};fmt=nvfp4;blk=128" for r in range(1, 16)]
    path = rp.write_report(make_report(n_layers=2, cfgs=cfgs), tmp_path / "r.json")
    an.analyze(path, tmp_path / "out")
    fig = plots.heatmap_figure(rp.load_report(path))
    assert [ax.get_title() for ax in _panels(fig)] == cfgs[:12]
    assert "showing 12 of 15 configs" in fig.get_suptitle()
    width, height = png_size(tmp_path / "out" / "heatmap.png")
    assert width <= 3000 and height <= 3000


def test_grid_values_are_log10(tmp_path):
    report = make_report(n_layers=2, cfgs=CFGS[:1])
    layers, grids = plots.grid_values(report, CFGS[:1])
    nmse = report["by_layer"]["1"]["mlp"]["by_proj"]["down_proj"][CFGS[0]]["nmse"]
    assert layers == [0, 1]
    assert grids[CFGS[0]][1][PROJ_ORDER.index("down_proj")] == pytest.approx(math.log10(nmse))


def test_every_layer_is_labelled_and_no_panel_is_empty():
    """30 layers (SmolLM2's count): every panel labels all 30; a config without any finite
    nmse is not drawn (named in the title), and the grid has no blank axes left over."""
    report = make_report(n_layers=30, cfgs=CFGS)
    for by_block in report["by_layer"].values():
        for block in by_block.values():
            for per_cfg in block["by_proj"].values():
                per_cfg[CFGS[3]]["nmse"] = None
    fig = plots.heatmap_figure(report)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == CFGS[:3]
    assert len(fig.axes) == len(panels) + 1  # + the colorbar, nothing empty
    for ax in panels:
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(30)]
    assert f"not drawn (no data): {CFGS[3]}" in fig.get_suptitle()
    assert "log10(nmse)" in fig.axes[-1].get_ylabel()


def test_shared_color_scale_across_reports(tmp_path):
    """Two reports analyzed with one scale carry the same scale in their PNGs; it spans both
    reports' values (at most LOG_SPAN decades below the worst)."""
    a, b = make_report(seed=1), make_report(seed=2)
    for by_block in b["by_layer"].values():  # b much worse, and one exact case far below
        for block in by_block.values():
            for per_cfg in block["by_proj"].values():
                for m in per_cfg.values():
                    m["nmse"] *= 10
    b["by_layer"]["0"]["self_attn"]["by_proj"]["k_proj"][CFGS[0]]["nmse"] = 1e-17
    values = [math.log10(m["nmse"]) for r in (a, b) for *_k, m in rp.iter_metrics(r)]
    vmin, vmax = plots.color_limits(a, b)
    assert vmax == pytest.approx(max(values))
    assert vmin == pytest.approx(max(min(values), vmax - plots.LOG_SPAN))
    pa = an.analyze(rp.write_report(a, tmp_path / "a.json"), tmp_path / "a", vlim=(vmin, vmax))
    pb = an.analyze(rp.write_report(b, tmp_path / "b.json"), tmp_path / "b", vlim=(vmin, vmax))
    scales = [plots.png_text(p.read_bytes())[plots.COLOR_SCALE_KEY] for p in pa + pb if p.suffix == ".png"]
    assert len(scales) == 2 and scales[0] == scales[1] == f"{vmin!r} {vmax!r}"
    # alone, each report would get its own scale
    assert plots.color_limits(a) != plots.color_limits(b)


def test_delta_heatmap_is_log10_ratio_centred_at_zero():
    a, b = make_report(seed=1), make_report(seed=2)
    layers, cfgs, grids = plots.delta_values(a, b)
    assert layers == list(range(5)) and cfgs == CFGS
    na = a["by_layer"]["3"]["mlp"]["by_proj"]["up_proj"][CFGS[1]]["nmse"]
    nb = b["by_layer"]["3"]["mlp"]["by_proj"]["up_proj"][CFGS[1]]["nmse"]
    assert grids[CFGS[1]][3][PROJ_ORDER.index("up_proj")] == pytest.approx(math.log10(nb / na))
    fig = plots.delta_figure(a, b, "no calibration", "smoothed")
    image = _panels(fig)[0].images[0]
    lo, hi = image.get_clim()
    assert lo == -hi and hi > 0  # diverging scale centred at 0
    assert image.get_cmap().name.startswith("RdBu_r")
    assert "log10(nmse smoothed / nmse no calibration)" in fig.axes[-1].get_ylabel()


@pytest.mark.parametrize("content", ["{broken", '{"meta": {}, "by_layer": {}}'])
def test_bad_report_names_the_flag(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HarnessError, match="--report") as info:
        an.analyze(path, tmp_path / "out")
    assert "bad.json" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_empty_reports(tmp_path):
    with pytest.raises(HarnessError, match="--report.*does not exist"):
        an.analyze(tmp_path / "nope.json", tmp_path / "out")
    empty = make_report(n_layers=0)
    path = rp.write_report(empty, tmp_path / "empty.json")
    with pytest.raises(HarnessError, match="nothing to analyze"):
        an.analyze(path, tmp_path / "out")


def test_unwritable_out_dir(report_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HarnessError, match="--out_dir"):
        an.analyze(report_path, blocker / "out")
