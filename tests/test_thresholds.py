"""cases.py and thresholds.py: case ids, rule matching, failure text, validation of thresholds.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import QSpec, SvdqConfig
from tokenwise_harness.report.document import METRIC_KEYS
from tokenwise_harness.verdict.cases import Case, parse_case_id
from tokenwise_harness.verdict.thresholds import (
    METRICS,
    format_pair,
    load_thresholds,
    parse_thresholds,
)

REPO = Path(__file__).resolve().parents[1]


def case(layer=0, block="self_attn", proj="q_proj", rank=16, fmt="nvfp4", blk=128, smooth=False, **cfg):
    return Case(layer, block, proj, SvdqConfig(rank, fmt, blk, **cfg), smooth)


def load_text(tmp_path, text, name="thresholds.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_thresholds(path)


def rules(*entries, defaults=None):
    """Thresholds from rule dicts, without a file."""
    doc = {"rules": list(entries)}
    if defaults is not None:
        doc["defaults"] = defaults
    return parse_thresholds(doc, "t.yaml")


# ---------------------------------------------------------------- cases


def test_case_id_words():
    assert case().case_id == "layer0-self_attn-q_proj-rank16-nvfp4-blk128"
    assert case(3, "mlp", "down_proj", 0, "fp4", "in", smooth=True).case_id == "layer3-mlp-down_proj-rank0-fp4-blkin-smooth"
    assert case(rank=8, fmt="none", blk=None).case_id == "layer0-self_attn-q_proj-rank8-none-blknone"
    assert case().module_path == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "c",
    [
        case(),
        case(12, "mlp", "gate_proj", 0, "int4_asym", 64, smooth=True),
        case(rank=32, fmt="none", blk=None),
        case(blk="in", afmt="int8", ablk="in"),
        case(afmt="nvfp4", ablk=16, iters=3, smooth=True),
    ],
    ids=lambda c: c.case_id,
)
def test_parse_case_id_round_trips(c):
    assert parse_case_id(c.case_id) == c


@pytest.mark.parametrize(
    "text",
    ["layer01-self_attn-q_proj-rank16-nvfp4-blk128", "layer0-mlp-q_proj-rank16-nvfp4-blk128",
     "layer0-self_attn-q_proj-rank16-nvfp4-blk128-iters1", "layer0-self_attn-q_proj", "x"],
)
def test_parse_case_id_rejects_non_ids(text):
    assert parse_case_id(text) is None


def test_case_rejects_projections_outside_the_allowlist():
    with pytest.raises(ValueError):
        case(block="mlp", proj="q_proj")
    with pytest.raises(ValueError):
        case(block="self_attn", proj="../../etc")


def test_case_sort_key_is_layer_then_forward_order_then_config():
    cs = [case(1, "mlp", "down_proj"), case(0, "mlp", "up_proj"), case(0, "self_attn", "q_proj", rank=32),
          case(0, "self_attn", "q_proj", rank=8), case(0, "self_attn", "q_proj", rank=8, smooth=True)]
    ids = [c.case_id for c in sorted(cs, key=Case.sort_key)]
    assert ids == [
        "layer0-self_attn-q_proj-rank8-nvfp4-blk128",
        "layer0-self_attn-q_proj-rank8-nvfp4-blk128-smooth",
        "layer0-self_attn-q_proj-rank32-nvfp4-blk128",
        "layer0-mlp-up_proj-rank16-nvfp4-blk128",
        "layer1-mlp-down_proj-rank16-nvfp4-blk128",
    ]


def test_gated_metrics_are_report_metrics():
    assert set(METRICS) <= set(METRIC_KEYS)


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "spec, layers",
    [
        (3, {3}),
        ("3", {3}),
        ("0-3", {0, 1, 2, 3}),
        (" 2 - 4 ", {2, 3, 4}),
        ([0, "5-6", "9"], {0, 5, 6, 9}),
        (">=8", {8, 9}),
        (">7", {8, 9}),
        ("<2", {0, 1}),
        ("<=1", {0, 1}),
        ("==4", {4}),
        ([">=9", "<1"], {0, 9}),
    ],
)
def test_layer_specs(spec, layers):
    th = rules({"match": {"layer": spec}, "limits": {"nmse": 0.01}})
    assert {n for n in range(10) if th.limits_for(case(layer=n))} == layers


@pytest.mark.parametrize(
    "spec, ranks",
    [(16, {16}), ([8, 32], {8, 32}), (">=16", {16, 32, 64}), ("<16", {0, 8}), ("8-16", {8, 16})],
)
def test_rank_specs(spec, ranks):
    th = rules({"match": {"rank": spec}, "limits": {"nmse": 0.01}})
    assert {r for r in (0, 8, 16, 32, 64) if th.limits_for(case(rank=r))} == ranks


@pytest.mark.parametrize(
    "match, hits, misses",
    [
        ({"block": "mlp"}, [case(block="mlp", proj="up_proj")], [case()]),
        ({"proj": ["q_proj", "k_proj"]}, [case(), case(proj="k_proj")], [case(proj="v_proj")]),
        ({"fmt": "nvfp4"}, [case()], [case(fmt="int4")]),
        ({"fmt": "none"}, [case(fmt="none", blk=None)], [case()]),
        ({"blk": 128}, [case()], [case(blk=16), case(blk="in")]),
        ({"blk": "in"}, [case(blk="in")], [case()]),
        ({"blk": ["none", 16]}, [case(fmt="none", blk=None), case(blk=16)], [case()]),
        ({"blk": None}, [case(fmt="none", blk=None)], [case()]),
        ({"smooth": True}, [case(smooth=True)], [case()]),
        ({"smooth": False}, [case()], [case(smooth=True)]),
        ({"afmt": "none"}, [case()], [case(afmt="int8", ablk="in")]),
        ({"afmt": "int8", "ablk": "in"}, [case(afmt="int8", ablk="in")], [case(afmt="int8", ablk=32)]),
        ({"iters": ">1"}, [case(iters=2)], [case()]),
        ({}, [case(), case(7, "mlp", "down_proj")], []),
        (
            {"layer": "0-3", "proj": ["q_proj", "k_proj"], "fmt": "nvfp4", "rank": ">=16"},
            [case(3, proj="k_proj", rank=32)],
            [case(4), case(proj="v_proj"), case(fmt="fp4"), case(rank=8)],
        ),
    ],
)
def test_match_fields(match, hits, misses):
    th = rules({"match": match, "limits": {"nmse": 0.01}})
    assert all(th.limits_for(c) for c in hits)
    assert not any(th.limits_for(c) for c in misses)


def test_first_matching_rule_wins_per_metric_and_defaults_fill_in():
    th = rules(
        {"match": {"layer": "0-3", "proj": ["q_proj", "k_proj"]}, "limits": {"nmse": 0.01}},
        {"match": {"layer": 0}, "limits": {"nmse": 0.5, "token_rel_l2_max": 0.7}},
        {"match": {"block": "mlp"}, "limits": {"nmse": 0.02}},
        defaults={"nmse": 0.05, "token_rel_l2_max": 1.0, "sse": None},
    )
    lim = th.limits_for(case())
    assert (lim["nmse"].value, lim["nmse"].rule) == (0.01, "rules[0]: layer 0-3, proj q_proj|k_proj")
    assert (lim["token_rel_l2_max"].value, lim["token_rel_l2_max"].rule) == (0.7, "rules[1]: layer 0")
    lim = th.limits_for(case(5, "mlp", "up_proj"))
    assert (lim["nmse"].value, lim["nmse"].rule) == (0.02, "rules[2]: block mlp")
    assert (lim["token_rel_l2_max"].value, lim["token_rel_l2_max"].rule) == (1.0, "defaults")
    lim = th.limits_for(case(5))
    assert {m: (l.value, l.rule) for m, l in lim.items()} == {
        "nmse": (0.05, "defaults"),
        "token_rel_l2_max": (1.0, "defaults"),
    }
    assert list(lim) == [m for m in METRICS if m in lim]


def test_null_limit_in_a_rule_removes_the_default():
    th = rules({"match": {"fmt": "none"}, "limits": {"nmse": None}}, defaults={"nmse": 0.05})
    assert th.limits_for(case(fmt="none", blk=None)) == {}
    assert th.limits_for(case())["nmse"].value == 0.05


def test_no_file_means_no_limits(tmp_path):
    for th in (load_thresholds(None), load_thresholds(tmp_path / "thresholds.yaml", explicit=False),
               load_text(tmp_path, "# only comments\n")):
        assert th.limits_for(case()) == {}
        assert th.tolerance("nmse") == (0.05, 1e-9)
        assert th.grid is None
        assert th.check(case(), {"nmse": 123.0}) == []


# ---------------------------------------------------------------- check


def test_failure_message_names_case_metric_value_limit_and_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    th = load_text(tmp_path, """
rules:
  - match: {layer: "0-3", proj: [q_proj, k_proj]}
    limits: {nmse: 0.01}
""")
    assert th.check(case(), {"nmse": 0.0123}) == [
        "layer0-self_attn-q_proj-rank16-nvfp4-blk128: nmse = 0.0123 > limit 0.01 "
        "(thresholds.yaml rules[0]: layer 0-3, proj q_proj|k_proj)"
    ]


def test_check_boundaries_and_lower_bound():
    th = rules(defaults={"nmse": 0.01, "sqnr_db": 20.0})
    assert th.check(case(), {"nmse": 0.01}) == []  # at the limit passes (sqnr exactly 20 dB)
    nmse = math.nextafter(0.01, 1.0)
    assert th.check(case(), {"nmse": nmse})[0].endswith(f"nmse = {nmse!r} > limit 0.01 (t.yaml defaults)")
    failures = th.check(case(), {"nmse": 0.0101})
    assert failures[1].endswith("sqnr_db = 19.96 < limit 20 (t.yaml defaults)")
    assert th.check(case(), {"nmse": 0.0}) == []  # exact: +inf dB


def test_sqnr_db_is_derived_from_nmse_not_taken_as_given():
    th = rules(defaults={"sqnr_db": 20.0})
    assert th.check(case(), {"nmse": 0.1, "sqnr_db": 99.0})[0].endswith("sqnr_db = 10 < limit 20 (t.yaml defaults)")


def test_nan_always_fails_even_without_limit():
    th = rules()
    why = "is not a finite number (always fails: NaN/Inf in the quantized weight, the activations or the error)"
    cid = "layer0-self_attn-q_proj-rank16-nvfp4-blk128"
    assert th.check(case(), {"nmse": math.nan, "token_l2_max": None, "denom": math.nan}) == [
        f"{cid}: nmse = nan {why}", f"{cid}: token_l2_max = null {why}", f"{cid}: denom = nan {why}",
    ]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, None])
@pytest.mark.parametrize("metric", ["nmse", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
                                    "token_rel_l2_max", "sse", "denom"])
def test_any_nonfinite_metric_fails_the_case(metric, value):
    """An Inf fails like a NaN, limit or not (it used to pass a case without a limit on it)."""
    metrics = {"nmse": 0.01, "token_l2_mean": 0.1, "token_l2_max": 0.2, "token_rel_l2_mean": 0.01,
               "token_rel_l2_max": 0.02, "sse": 1.0, "denom": 100.0, "n_tokens": 8, metric: value}
    (msg,) = rules().check(case(), metrics)
    assert f": {metric} = " in msg and "is not a finite number (always fails" in msg
    assert rules().check(case(), {**metrics, metric: 0.5}) == []


def test_limited_metric_missing_from_the_run_fails():
    th = rules(defaults={"token_l2_max": 3.0})
    (msg,) = th.check(case(), {"nmse": 0.01})
    assert "token_l2_max has a limit (t.yaml defaults) but the run reported no token_l2_max" in msg


def test_format_pair_shows_enough_digits():
    assert format_pair(0.0123, 0.01) == ("0.0123", "0.01")
    assert format_pair(0.010000001, 0.01) == ("0.010000001", "0.01")


# ---------------------------------------------------------------- tolerances and grid


def test_tolerances(tmp_path):
    th = load_text(tmp_path, """
baseline:
  default: {rtol: 0.1}
  metrics:
    nmse: {rtol: 0.02, atol: 1e-9}
    token_l2_max: {atol: 0.5}
    sse: null
""")
    assert th.tolerance("token_rel_l2_mean") == (0.1, 1e-9)
    assert th.tolerance("nmse") == (0.02, 1e-9)  # `1e-9` is a YAML string: read as a number
    assert th.tolerance("token_l2_max") == (0.1, 0.5)
    assert th.tolerance("sse") is None
    assert th.tolerance_rule("nmse").endswith("thresholds.yaml baseline.metrics.nmse")
    assert th.tolerance_rule("token_l2_mean").endswith("thresholds.yaml baseline.default")


def test_grid_section(tmp_path):
    th = load_text(tmp_path, """
grid:
  ranks: "32,8"
  qspecs: [nvfp4@16, int4@in]
  grid_mode: full
  act_qspecs: []
  iters: 2
""")
    assert th.grid == {
        "ranks": [8, 32],
        "qspecs": [QSpec("nvfp4", 16), QSpec("int4", "in")],
        "act_qspecs": [],
        "grid_mode": "full",
        "iters": 2,
    }
    assert load_text(tmp_path, "grid: {ranks: [16]}\n").grid == {"ranks": [16]}


def test_repo_thresholds_yaml_is_valid_and_means_what_it_says():
    th = load_thresholds(REPO / "thresholds.yaml")
    assert th.grid["ranks"] == [16, 32]  # the repo's self-gate on SmolLM2-135M (tests/test_selfgate.py)
    assert {q.fmt for q in th.grid["qspecs"]} == {"nvfp4", "mxfp4", "int4"}
    assert th.capture == {"cn": 4, "eu": 4, "length": 64, "seed": 0}
    assert th.selects(15, "mlp", "up_proj") and not th.selects(14, "mlp", "up_proj")
    assert th.tolerance("nmse") == (0.01, 1e-9)
    assert th.limits_for(case(fmt="none", blk=None)) == {}
    assert th.limits_for(case(blk=16))["nmse"].value == 0.02
    assert th.limits_for(case(fmt="fp8", blk="in"))["nmse"].value == 0.005
    assert th.limits_for(case(blk=128))["nmse"].rule == "defaults"
    assert th.tolerance("sse") is None


# ---------------------------------------------------------------- validation


BAD_FILES = [
    ("capture: {cn: 0}\n", "capture.cn 0 must be an integer >= 1"),
    ("capture: {seed: -1}\n", "capture.seed -1 must be an integer >= 0"),
    ("capture: {tokens: 5}\n", "capture: unknown key 'tokens'"),
    ("select: {rank: 16}\n", "select: unknown field 'rank'; known: layer, block, proj"),
    ("select: {layer: '3-1'}\n", "select.layer: range '3-1' is empty"),
    ("defaults: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("limits: {nmse: 1}\n", "top level: unknown key 'limits'"),
    ("version: 2\n", "version 2 is not supported"),
    ("version: true\n", "version True is not supported"),
    ("defaults: {nmse: 1}\ndefaults: {sse: 1}\n", "duplicate key 'defaults'"),
    ("defaults: [nmse]\n", "defaults must be a mapping"),
    ("defaults: {nmsee: 0.1}\n", "defaults: unknown metric 'nmsee'"),
    ("defaults: {nmse: -0.1}\n", "defaults.nmse: -0.1 is negative"),
    ("defaults: {nmse: abc}\n", "defaults.nmse: 'abc' is not a finite number"),
    ("defaults: {nmse: true}\n", "defaults.nmse: True is not a finite number"),
    ("defaults: {nmse: .inf}\n", "defaults.nmse: inf is not a finite number"),
    ("rules: {match: {}}\n", "rules must be a list"),
    ("rules: [nmse]\n", "rules[0] must be a mapping"),
    ("rules: [{match: {layer: 1}}]\n", "rules[0] has no limits"),
    ("rules: [{match: {layer: 1}, limit: {nmse: 1}}]\n", "rules[0]: unknown key 'limit'"),
    ("rules: [{limits: {nmse: 1}}, {match: {layers: 1}, limits: {nmse: 1}}]\n", "rules[1].match: unknown field 'layers'"),
    ("rules: [{match: {layer: 1}, limits: {nmse: 1, mse: 2}}]\n", "rules[0].limits: unknown metric 'mse'"),
    ("rules: [{match: {layer: 1}, limits: {token_l2_max: -1}}]\n", "rules[0].limits.token_l2_max: -1 is negative"),
    ('rules: [{match: {layer: "0-"}, limits: {nmse: 1}}]\n', "rules[0].match.layer: bad value '0-'"),
    ('rules: [{match: {layer: "3-1"}, limits: {nmse: 1}}]\n', "rules[0].match.layer: range '3-1' is empty"),
    ('rules: [{match: {layer: -1}, limits: {nmse: 1}}]\n', "rules[0].match.layer: bad value -1"),
    ('rules: [{match: {layer: ">= x"}, limits: {nmse: 1}}]\n', "rules[0].match.layer: bad value '>= x'"),
    ('rules: [{match: {rank: [8, "=>16"]}, limits: {nmse: 1}}]\n', "rules[0].match.rank: bad value '=>16'"),
    ("rules: [{match: {layer: []}, limits: {nmse: 1}}]\n", "rules[0].match.layer: empty list"),
    ("rules: [{match: {block: attn}, limits: {nmse: 1}}]\n", "rules[0].match.block: unknown block 'attn'"),
    ("rules: [{match: {proj: [q_proj, qk_proj]}, limits: {nmse: 1}}]\n", "unknown projection 'qk_proj'"),
    ("rules: [{match: {fmt: nvpf4}, limits: {nmse: 1}}]\n", "rules[0].match.fmt: unknown format 'nvpf4'"),
    ("rules: [{match: {blk: 0}, limits: {nmse: 1}}]\n", "rules[0].match.blk: bad block 0"),
    ('rules: [{match: {smooth: "yes please"}, limits: {nmse: 1}}]\n', "match.smooth: 'yes please' must be true or false"),
    ("baseline: {rtol: 0.1}\n", "baseline: unknown key 'rtol'"),
    ("baseline: {default: {rtol: -1}}\n", "baseline.default.rtol: -1 is negative"),
    ("baseline: {default: {rtol: 0.1, reltol: 1}}\n", "baseline.default: unknown key 'reltol'"),
    ("baseline: {metrics: {nmse_db: {rtol: 1}}}\n", "baseline.metrics.nmse_db: unknown metric"),
    ("grid: {rank: [8]}\n", "grid: unknown key 'rank'"),
    ("grid: {ranks: [8, x]}\n", "grid.ranks: 'x' is not an integer rank"),
    ("grid: {qspecs: [nvfp4@16, nvfp5@16]}\n", "grid.qspecs: qspec 'nvfp5@16' has unknown format"),
    ("grid: {qspecs: []}\n", "grid.qspecs is empty"),
    ("grid: {grid_mode: fast}\n", "grid.grid_mode 'fast' is unknown"),
    ("grid: {iters: 0}\n", "grid.iters 0 must be an integer >= 1"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES, ids=[e for _, e in BAD_FILES])
def test_bad_files_give_one_line_naming_the_file(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HarnessError) as info:
        load_text(tmp_path, text, name="my_thresholds.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("my_thresholds.yaml: "), msg
    assert expected in msg, msg


def test_explicit_missing_file_names_the_flag(tmp_path):
    with pytest.raises(HarnessError, match=r"^--thresholds: .* does not exist or is not a file"):
        load_thresholds(tmp_path / "nope.yaml")
    with pytest.raises(HarnessError, match=r"^--thresholds: .* is a directory; give a YAML file"):
        load_thresholds(tmp_path)


def test_path_outside_cwd_is_shown_as_given(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(HarnessError, match=f"^{tmp_path}/t.yaml: version"):
        load_text(tmp_path, "version: 3\n", name="t.yaml")
