"""report.py: building, canonical JSON, non-finite encoding, schema validation, loading."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.report import document as rp

CFGS = ["rank=32;fmt=nvfp4;blk=128", "rank=16;fmt=nvfp4;blk=128", "rank=16;fmt=fp4;blk=in"]
SEED_METRIC_KEYS = ["nmse", "sqnr_db", "token_l2_mean", "token_l2_max", "token_rel_l2_mean", "token_rel_l2_max",
                    "sse", "denom", "n_tokens"]
BLOCK_OF = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJ_ORDER}


def make_meta(**extra):
    meta = {
        "xy_path": "cache_xy/demo.safetensors",
        "xy_meta": {"seed": "0", "cn": "50", "eu": "80", "length": "128", "save_dtype": "fp16"},
        "grid_mode": "combined",
        "ranks": [16, 32],
        "qspecs": [("nvfp4", 128), ("fp4", "in")],
        "smooth": False,
        "chunk_tokens": 4096,
        "configs": list(CFGS),
    }
    meta.update(extra)
    return meta


def make_metrics(nmse, n_tokens=256):
    return {
        "nmse": nmse, "token_l2_mean": 0.5 * (nmse or 1), "token_l2_max": 2.0 * (nmse or 1),
        "token_rel_l2_mean": math.sqrt(nmse or 1) * 0.9, "token_rel_l2_max": math.sqrt(nmse or 1) * 3.0,
        "sse": 10.0 * (nmse or 1), "denom": 10.0, "n_tokens": n_tokens,
    }


def make_results(layers=(0, 1, 2, 10), seed=0, cfgs=CFGS):
    rng = random.Random(seed)
    results = {}
    for layer in layers:
        for proj in PROJ_ORDER:
            results[(layer, BLOCK_OF[proj], proj)] = {c: make_metrics(rng.uniform(1e-4, 1e-1)) for c in cfgs}
    return results


@pytest.fixture
def report():
    return rp.build_report(make_meta(), make_results())


# ---------------------------------------------------------------- build_report

def test_agg_matches_independent_recomputation():
    results = make_results()
    report = rp.build_report(make_meta(), results)
    for (layer, block), projs in _group_by_block(results).items():
        for cfg in CFGS:
            nmses = [results[(layer, block, p)][cfg]["nmse"] for p in projs]
            agg = report["by_layer"][str(layer)][block]["agg"][cfg]
            assert agg["n_proj"] == len(projs)
            assert agg["nmse_mean_over_proj"] == pytest.approx(sum(nmses) / len(nmses), rel=1e-14)
            assert agg["nmse_max_over_proj"] == max(nmses)


def _group_by_block(results):
    groups = {}
    for layer, block, proj in results:
        groups.setdefault((layer, block), []).append(proj)
    return groups


def test_agg_counts_only_projections_that_have_the_config():
    results = make_results(layers=(0,))
    del results[(0, "self_attn", "k_proj")][CFGS[0]]
    report = rp.build_report(make_meta(), results)
    agg = report["by_layer"]["0"]["self_attn"]["agg"]
    assert agg[CFGS[0]]["n_proj"] == 3 and agg[CFGS[1]]["n_proj"] == 4


def test_shape_and_ordering(report):
    assert list(report) == ["meta", "by_layer"]
    assert list(report["by_layer"]) == ["0", "1", "2", "10"]
    layer = report["by_layer"]["10"]
    assert list(layer) == ["self_attn", "mlp"]
    assert list(layer["self_attn"]) == ["by_proj", "agg"]
    assert list(layer["self_attn"]["by_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert list(layer["mlp"]["by_proj"]) == ["gate_proj", "up_proj", "down_proj"]
    assert list(layer["mlp"]["by_proj"]["up_proj"]) == CFGS  # grid order from meta["configs"]
    assert list(layer["mlp"]["agg"]) == CFGS
    # the seed's §2.5 field lists, written out (not read back from report/document.py)
    assert list(layer["mlp"]["by_proj"]["up_proj"][CFGS[0]]) == SEED_METRIC_KEYS
    assert list(layer["mlp"]["agg"][CFGS[0]]) == ["nmse_mean_over_proj", "nmse_max_over_proj", "n_proj"]
    assert list(report["meta"])[:7] == ["xy_path", "xy_meta", "grid_mode", "ranks", "qspecs", "smooth", "chunk_tokens"]


def test_meta_normalized(report):
    meta = report["meta"]
    assert meta["qspecs"] == [["nvfp4", "128"], ["fp4", "in"]]
    assert meta["ranks"] == [16, 32] and meta["smooth"] is False


def test_configs_without_meta_configs_are_sorted_by_grid_key():
    meta = make_meta()
    del meta["configs"]
    report = rp.build_report(meta, make_results(layers=(0,)))
    order = list(report["by_layer"]["0"]["mlp"]["agg"])
    assert order == ["rank=16;fmt=fp4;blk=in", "rank=16;fmt=nvfp4;blk=128", "rank=32;fmt=nvfp4;blk=128"]


def test_sqnr_db_derived_from_nmse(report):
    m = report["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"][CFGS[0]]
    assert m["sqnr_db"] == pytest.approx(-10 * math.log10(m["nmse"]))
    assert isinstance(m["n_tokens"], int)


def test_missing_metric_key_is_refused():
    results = make_results(layers=(0,))
    del results[(0, "mlp", "up_proj")][CFGS[0]]["sse"]
    with pytest.raises(ValueError, match="sse"):
        rp.build_report(make_meta(), results)


def test_non_allowlisted_projection_is_refused():
    with pytest.raises(ValueError, match="allowlisted"):
        rp.build_report(make_meta(), {(0, "mlp", "q_proj"): {CFGS[0]: make_metrics(0.1)}})


# ---------------------------------------------------------------- non-finite numbers

def test_nan_and_inf_become_null_and_poison_agg():
    results = make_results(layers=(0,))
    results[(0, "self_attn", "v_proj")][CFGS[0]]["nmse"] = float("nan")
    results[(0, "self_attn", "v_proj")][CFGS[0]]["token_l2_max"] = float("inf")
    report = rp.build_report(make_meta(), results)
    m = report["by_layer"]["0"]["self_attn"]["by_proj"]["v_proj"][CFGS[0]]
    assert m["nmse"] is None and m["sqnr_db"] is None and m["token_l2_max"] is None
    agg = report["by_layer"]["0"]["self_attn"]["agg"][CFGS[0]]
    assert agg == {"nmse_mean_over_proj": None, "nmse_max_over_proj": None, "n_proj": 4}
    assert report["by_layer"]["0"]["self_attn"]["agg"][CFGS[1]]["nmse_max_over_proj"] is not None
    text = rp.dumps_report(report)
    assert "NaN" not in text and "Infinity" not in text
    rp.validate_report(json.loads(text))


def test_zero_nmse_gives_null_sqnr():
    results = make_results(layers=(0,))
    results[(0, "mlp", "down_proj")][CFGS[0]]["nmse"] = 0.0
    report = rp.build_report(make_meta(), results)
    m = report["by_layer"]["0"]["mlp"]["by_proj"]["down_proj"][CFGS[0]]
    assert m["nmse"] == 0.0 and m["sqnr_db"] is None


def test_dumps_sanitizes_nan_in_hand_built_report(report):
    report["meta"]["extra"] = float("nan")
    assert json.loads(rp.dumps_report(report))["meta"]["extra"] is None


# ---------------------------------------------------------------- determinism

def test_dumps_is_deterministic_and_round_trips(report):
    text = rp.dumps_report(report)
    assert text == rp.dumps_report(report)
    assert text.endswith("\n")
    assert json.loads(text) == report
    assert rp.dumps_report(json.loads(text)) == text


def test_permuted_input_order_gives_same_bytes():
    results = make_results()
    meta = make_meta(run={"host": "x", "started": "t"})
    base = rp.dumps_report(rp.build_report(meta, results))
    rng = random.Random(1)
    for _ in range(3):
        cases = list(results.items())
        rng.shuffle(cases)
        shuffled = {}
        for case, per_cfg in cases:
            cfgs = list(per_cfg.items())
            rng.shuffle(cfgs)
            shuffled[case] = {c: dict(reversed(list(m.items()))) for c, m in cfgs}
        meta_items = list(meta.items())
        rng.shuffle(meta_items)
        assert rp.dumps_report(rp.build_report(dict(meta_items), shuffled)) == base


def test_layers_in_numeric_order_in_text(report):
    text = rp.dumps_report(report)
    assert text.index('"2": {') < text.index('"10": {')


def test_comparable_drops_run_info():
    a = rp.build_report(make_meta(run={"time": "1"}), make_results(layers=(0,)))
    b = rp.build_report(make_meta(run={"time": "2"}), make_results(layers=(0,)))
    assert rp.dumps_report(a) != rp.dumps_report(b)
    assert rp.dumps_report(rp.comparable(a)) == rp.dumps_report(rp.comparable(b))


# ---------------------------------------------------------------- schema

def test_good_report_validates(report):
    rp.validate_report(report)
    assert rp.structural_problem(report) is None


def _drop_metric(r):
    del r["by_layer"]["1"]["mlp"]["by_proj"]["gate_proj"][CFGS[2]]["token_rel_l2_max"]


def _drop_agg(r):
    del r["by_layer"]["0"]["self_attn"]["agg"][CFGS[1]]["n_proj"]


def _drop_xy_path(r):
    del r["meta"]["xy_path"]


def _drop_block_agg(r):
    del r["by_layer"]["2"]["mlp"]["agg"]


BREAKERS = {
    "metric key": (_drop_metric, "token_rel_l2_max"),
    "agg field": (_drop_agg, "n_proj"),
    "meta xy_path": (_drop_xy_path, "xy_path"),
    "block agg": (_drop_block_agg, "agg"),
}


@pytest.mark.parametrize("name", list(BREAKERS))
def test_schema_rejects_missing_fields(report, name):
    breaker, word = BREAKERS[name]
    bad = copy.deepcopy(report)
    breaker(bad)
    with pytest.raises(HarnessError, match=word) as info:
        rp.validate_report(bad, "r.json")
    assert "\n" not in str(info.value) and "r.json" in str(info.value)
    assert word in rp.structural_problem(bad)  # the fallback without jsonschema agrees


@pytest.mark.parametrize("path, value", [
    (("meta", "qspecs"), [["nvfp4", 128]]),
    (("meta", "grid_mode"), "partial"),
    (("meta", "chunk_tokens"), 0),
])
def test_schema_rejects_wrong_meta_types(report, path, value):
    report[path[0]][path[1]] = value
    with pytest.raises(HarnessError, match="schema"):
        rp.validate_report(report)


def test_schema_rejects_unknown_projection_and_allows_extras(report):
    report["meta"]["model_fingerprint"] = "abc"
    report["by_layer"]["0"]["mlp"]["by_proj"]["up_proj"][CFGS[0]]["cos_sim"] = 0.99
    rp.validate_report(report)
    report["by_layer"]["0"]["mlp"]["by_proj"]["q_proj"] = {}
    with pytest.raises(HarnessError):
        rp.validate_report(report)


def test_validate_without_jsonschema_falls_back(report, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jsonschema(name, *args, **kwargs):
        if name == "jsonschema":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    rp.validate_report(report)
    del report["meta"]["smooth"]
    with pytest.raises(HarnessError, match="smooth"):
        rp.validate_report(report)


# ---------------------------------------------------------------- files

def test_write_then_load(tmp_path, report):
    path = rp.write_report(report, tmp_path / "sub" / "r.json")
    assert rp.load_report(path) == report
    assert path.read_text(encoding="utf-8") == rp.dumps_report(report)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp files left


def test_write_invalid_report_writes_nothing(tmp_path, report):
    del report["meta"]["ranks"]
    with pytest.raises(HarnessError, match="--out_json"):
        rp.write_report(report, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("content, word", [
    ("{not json", "not valid JSON"),
    ('{"meta": {}, "by_layer": {}}', "schema"),
    ('{"x": NaN}', "NaN"),
    ("[]", "schema"),
])
def test_load_bad_files(tmp_path, content, word):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HarnessError, match=word) as info:
        rp.load_report(path)
    message = str(info.value)
    assert "--report" in message and "bad.json" in message and "\n" not in message


def test_load_missing_file(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        rp.load_report(tmp_path / "nope.json", flag="--baseline")


def test_report_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tokenwise_harness.report.document, tokenwise_harness.report.analyze; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
