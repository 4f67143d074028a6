"""baselines.py: the store (layout, round trip, updates, stale cases, bad files) and the comparison."""

from __future__ import annotations

import json
import math

import pytest

from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.verdict.baselines import (
    BaselineStore,
    UpdateSummary,
    compare_metrics,
    explain_provenance,
    git_commit,
    model_id,
)
from tokenwise_harness.verdict.cases import Case
from tokenwise_harness.verdict.thresholds import format_pair, parse_thresholds, regression_bound

MID = "demo-0123456789"
PROV = {
    "model_fingerprint": "m1", "cache_fingerprint": "c1", "harness_version": "0.1.0",
    "torch_version": "2.5.1", "cuda_version": "12.4", "device": "NVIDIA H100", "dtype": "bfloat16",
    "git_commit": "aaaa",
}
TH = parse_thresholds(
    {"baseline": {"default": {"rtol": 0.05, "atol": 1e-9},
                  "metrics": {"nmse": {"rtol": 0.02, "atol": 1e-9}, "sse": None}}},
    "thresholds.yaml",
)


def cid(layer=0, proj="q_proj", rank=16, block=None):
    block = block or ("mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn")
    return Case(layer, block, proj, SvdqConfig(rank, "nvfp4", 128)).case_id


def metrics(nmse=0.01, **extra):
    m = {"nmse": nmse, "token_l2_mean": 0.5, "token_l2_max": 2.0, "token_rel_l2_mean": 0.1,
         "token_rel_l2_max": 0.4, "sse": 10.0 * nmse, "denom": 10.0, "n_tokens": 256}
    m.update(extra)
    return m


def store(tmp_path, **kw):
    return BaselineStore(tmp_path / "baselines", MID, **kw)


def seed(tmp_path, cases, prov=PROV):
    s = store(tmp_path)
    for case_id, m in cases.items():
        s.record(case_id, m)
    return s.flush(prov)


# ---------------------------------------------------------------- names and paths


def test_model_id():
    mid = model_id("/models/Qwen3-8B/", "fp")
    assert mid.startswith("Qwen3-8B-") and len(mid) == len("Qwen3-8B-") + 10
    assert model_id("Qwen/Qwen3-8B", "fp") == mid
    assert model_id("/models/Qwen3-8B", "other") != mid
    assert model_id("/x/..", "fp").startswith("model-")
    assert model_id("we ird/na..me ü", "fp") == "na.me-" + model_id("x", "fp").split("-")[1]
    for name in ("../..", "a b/c:d", "..hidden", "C:\\models\\m"):
        BaselineStore("b", model_id(name, "fp"))  # always a safe name


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".", "", "a\\b", "x..y", ".hidden"])
def test_model_id_cannot_escape(tmp_path, bad):
    with pytest.raises(HarnessError, match="model id .* is not a plain name"):
        BaselineStore(tmp_path, bad)


@pytest.mark.parametrize(
    "bad", ["../layer0-x", "layer0-x/../../y", "layer0-a/b", "/etc/passwd", "q_proj-layer0", "layer0..-x"]
)
def test_case_id_cannot_escape(tmp_path, bad):
    s = store(tmp_path)
    for call in (lambda: s.record(bad, metrics()), lambda: s.get(bad), lambda: s.delete([bad])):
        with pytest.raises(HarnessError, match="case id"):
            call()


def test_layout_and_text(tmp_path):
    ids = [cid(0, "q_proj", 16), cid(0, "q_proj", 8), cid(0, "down_proj", 32), cid(2, "k_proj")]
    summary = seed(tmp_path, {i: metrics() for i in ids})
    layer0 = tmp_path / "baselines" / MID / "layer0.json"
    assert summary.files == [layer0, tmp_path / "baselines" / MID / "layer2.json"]
    text = layer0.read_text()
    lines = text.splitlines()
    assert text.endswith("}\n") and lines[1] == '  "schema_version": 1,'
    case_lines = [line.strip() for line in lines if line.strip().startswith('"layer')]
    assert [line.split('"')[1] for line in case_lines] == [  # one line per case, natural order
        "layer0-mlp-down_proj-rank32-nvfp4-blk128",
        "layer0-self_attn-q_proj-rank8-nvfp4-blk128",
        "layer0-self_attn-q_proj-rank16-nvfp4-blk128",
    ]
    assert case_lines[0].startswith('"layer0-mlp-down_proj-rank32-nvfp4-blk128": {"nmse": 0.01, "token_l2_mean"')
    assert case_lines[0].endswith('"n_tokens": 256, "provenance": "%s"},' % json.loads(text)["cases"][ids[2]]["provenance"])
    doc = json.loads(text)
    (prov,) = doc["provenance"].values()
    assert prov == dict(sorted(PROV.items()))


# ---------------------------------------------------------------- round trip and updates


def test_round_trip(tmp_path):
    import numpy as np

    m = metrics(nmse=0.012345678901234567, token_l2_max=math.inf, token_rel_l2_max=math.nan,
                n_tokens=np.int64(256), denom=np.float32(10.0))
    seed(tmp_path, {cid(): m})
    s = store(tmp_path)
    got = s.get(cid())
    assert got["nmse"] == 0.012345678901234567 and got["n_tokens"] == 256 and isinstance(got["n_tokens"], int)
    assert got["token_l2_max"] is None and got["token_rel_l2_max"] is None  # non-finite -> null
    assert s.get(cid(1)) is None and s.get(cid(rank=8)) is None
    assert s.provenance_of(cid()) == PROV and s.provenance_of(cid(rank=8)) is None
    assert s.case_ids() == [cid()]


def test_update_keeps_other_cases_and_reports_what_changed(tmp_path):
    a, b, c, d = cid(rank=8), cid(rank=16), cid(rank=32), cid(3, "up_proj")
    seed(tmp_path, {a: metrics(0.01), b: metrics(0.01), d: metrics()})
    layer3 = (tmp_path / "baselines" / MID / "layer3.json").read_bytes()
    s = store(tmp_path)
    s.record(b, metrics(0.0123))
    s.record(c, metrics(0.02))
    summary = s.flush({**PROV, "git_commit": "bbbb"})
    assert (summary.added, summary.changed, summary.unchanged) == ([c], [b], [])
    assert summary.details[b] == "nmse 0.01 -> 0.0123, sse 0.1 -> 0.123"
    assert summary.files == [tmp_path / "baselines" / MID / "layer0.json"]
    fresh = store(tmp_path)
    assert fresh.get(a) == metrics(0.01) and fresh.provenance_of(a)["git_commit"] == "aaaa"
    assert fresh.get(b)["nmse"] == 0.0123 and fresh.provenance_of(b)["git_commit"] == "bbbb"
    assert fresh.get(c)["nmse"] == 0.02
    assert (tmp_path / "baselines" / MID / "layer3.json").read_bytes() == layer3  # not touched


def test_same_numbers_are_not_rewritten_even_at_another_commit(tmp_path):
    seed(tmp_path, {cid(): metrics()})
    path = tmp_path / "baselines" / MID / "layer0.json"
    before = path.read_bytes()
    summary = seed(tmp_path, {cid(): metrics()}, {**PROV, "git_commit": "cccc"})
    assert summary.unchanged == [cid()] and summary.files == []
    assert path.read_bytes() == before


def test_same_numbers_in_a_new_environment_refresh_the_provenance(tmp_path):
    seed(tmp_path, {cid(): metrics(), cid(rank=8): metrics()})
    s = store(tmp_path)
    s.record(cid(), metrics())
    summary = s.flush({**PROV, "torch_version": "2.6.0"})
    assert summary.refreshed == [cid()] and summary.changed == []
    doc = json.loads((tmp_path / "baselines" / MID / "layer0.json").read_text())
    assert len(doc["provenance"]) == 2  # the untouched case keeps the old one
    assert store(tmp_path).provenance_of(cid())["torch_version"] == "2.6.0"


def test_flush_is_deterministic(tmp_path):
    ids = [cid(0, p, r) for p in ("q_proj", "up_proj", "o_proj") for r in (32, 8, 16)]
    one, two = BaselineStore(tmp_path / "one", MID), BaselineStore(tmp_path / "two", MID)
    for i in ids:
        one.record(i, metrics(0.1 / (1 + len(i))))
    for i in reversed(ids):
        two.record(i, dict(reversed(list(metrics(0.1 / (1 + len(i))).items()))))
    one.flush(PROV)
    two.flush(dict(reversed(list(PROV.items()))))
    first = (tmp_path / "one" / MID / "layer0.json").read_bytes()
    assert first == (tmp_path / "two" / MID / "layer0.json").read_bytes()
    for i in ids:  # flush the same content again: byte-identical
        one.record(i, metrics(0.1 / (1 + len(i))))
    one.flush(PROV)
    assert (tmp_path / "one" / MID / "layer0.json").read_bytes() == first


def test_new_only_creates_missing_and_keeps_existing(tmp_path):
    seed(tmp_path, {cid(rank=8): metrics(0.01)})
    s = store(tmp_path)
    s.record(cid(rank=8), metrics(0.5))
    s.record(cid(rank=16), metrics(0.02))
    summary = s.flush({**PROV, "torch_version": "9"}, new_only=True)
    assert (summary.added, summary.skipped, summary.changed) == ([cid(rank=16)], [cid(rank=8)], [])
    fresh = store(tmp_path)
    assert fresh.get(cid(rank=8))["nmse"] == 0.01 and fresh.provenance_of(cid(rank=8)) == PROV
    assert fresh.get(cid(rank=16))["nmse"] == 0.02


def test_delete_and_empty_files_are_removed(tmp_path):
    seed(tmp_path, {cid(0): metrics(), cid(0, rank=8): metrics(), cid(1): metrics()})
    s = store(tmp_path)
    s.delete([cid(0), cid(1), cid(5)])
    summary = s.flush(PROV)
    assert summary.deleted == [cid(0), cid(1)]
    assert not (tmp_path / "baselines" / MID / "layer1.json").exists()
    assert store(tmp_path).case_ids() == [cid(0, rank=8)]


def test_record_validates_metrics(tmp_path):
    with pytest.raises(TypeError):
        store(tmp_path).record(cid(), {"nmse": "0.1"})
    with pytest.raises(TypeError):
        store(tmp_path).record(cid(), {"provenance": 1.0})


# ---------------------------------------------------------------- stale


def test_stale_is_judged_within_the_selection(tmp_path):
    ids = [cid(0, "q_proj"), cid(0, "k_proj"), cid(1, "q_proj"), cid(1, "up_proj")]
    seed(tmp_path, {i: metrics() for i in ids})
    s = store(tmp_path)
    only_q = lambda case_id: "q_proj" in case_id  # noqa: E731  what `-k q_proj` selects
    assert s.stale({cid(0, "q_proj")}, only_q) == [cid(1, "q_proj")]
    assert s.stale({cid(0, "q_proj"), cid(1, "q_proj")}, only_q) == []
    assert s.stale(set(ids[:2])) == [cid(1, "up_proj"), cid(1, "q_proj")]  # natural order: mlp < self_attn
    assert BaselineStore(tmp_path / "none", MID).stale(set()) == []


# ---------------------------------------------------------------- comparison


def test_missing_baseline_fails_with_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = BaselineStore("baselines", MID, hint="pytest --model-dir M --update-baselines-new")
    assert s.compare(Case(0, "self_attn", "q_proj", SvdqConfig(16, "nvfp4", 128)), metrics(), TH) == [
        f"{cid()}: no baseline in baselines/{MID}/layer0.json; create it with pytest --model-dir M --update-baselines-new"
    ]


def test_regression_message(tmp_path):
    seed(tmp_path, {cid(): metrics(0.0123)})
    (msg,) = store(tmp_path).compare(cid(), metrics(0.0131, sse=0.123), TH)
    assert msg == (
        f"{cid()}: nmse = 0.0131 > 0.01255 allowed by baseline 0.0123 "
        "(rtol 0.02, atol 1e-09: thresholds.yaml baseline.metrics.nmse)"
    )


@pytest.mark.parametrize("base, rtol, atol", [(0.0123, 0.02, 1e-9), (0.0, 0.05, 1e-9), (3.5, 0.0, 0.0), (7.0, 0.1, 0.25)])
def test_tolerance_boundary_is_inclusive(base, rtol, atol):
    th = parse_thresholds({"baseline": {"default": {"rtol": rtol, "atol": atol}}}, "t.yaml")
    bound = regression_bound(base, rtol, atol)
    assert bound == pytest.approx(base * (1 + rtol) + atol, rel=1e-15, abs=0)
    assert compare_metrics("c", {"token_l2_max": bound}, {"token_l2_max": base}, th) == []
    above = math.nextafter(bound, math.inf)
    (msg,) = compare_metrics("c", {"token_l2_max": above}, {"token_l2_max": base}, th)
    shown, allowed = format_pair(above, bound)  # 1 ulp apart: still told apart
    assert shown != allowed
    assert msg.startswith(f"c: token_l2_max = {shown} > {allowed} allowed by baseline")


def test_sqnr_db_regresses_downwards_and_improvements_pass():
    th = parse_thresholds({"baseline": {"default": {"rtol": 1.0}, "metrics": {"sqnr_db": {"rtol": 0, "atol": 0.1}}}},
                          "t.yaml")
    base = {"nmse": 0.01}  # 20 dB
    assert compare_metrics("c", {"nmse": 0.001}, base, th) == []  # better
    assert compare_metrics("c", {"nmse": 0.0102}, base, th) == []  # 19.914 dB: within 0.1 dB
    (msg,) = compare_metrics("c", {"nmse": 0.0104}, base, th)  # 19.83 dB
    assert msg.startswith("c: sqnr_db = 19.83 < 19.9 allowed by baseline 20 (rtol 0, atol 0.1: t.yaml baseline.metrics.sqnr_db)")


def test_nulls_and_untracked_metrics():
    assert compare_metrics("c", {"sse": 1e9}, {"sse": 1.0}, TH) == []  # sse: null tolerance
    assert compare_metrics("c", {"nmse": math.nan}, {"nmse": 0.01}, TH) == []  # Thresholds.check fails NaN
    assert compare_metrics("c", {"token_l2_max": 1.0}, {}, TH) == []  # not in the baseline: nothing to compare
    (msg,) = compare_metrics("c", {"nmse": 0.01}, {"nmse": None}, TH, hint="pytest --update-baselines")
    assert msg == ("c: baseline nmse is null (the recorded run gave a non-finite value); "
                   "re-record it with pytest --update-baselines")


# ---------------------------------------------------------------- provenance


def test_explain_provenance_warns_on_benign_and_fails_on_fingerprints():
    current = {**PROV, "torch_version": "2.6.0", "device": "NVIDIA H200", "git_commit": "bbbb"}
    warnings, mismatches = explain_provenance(PROV, current)
    assert mismatches == []
    assert warnings == [
        "torch_version differs: baseline 2.5.1, this run 2.6.0",
        "device differs: baseline NVIDIA H100, this run NVIDIA H200",
        "git_commit differs: baseline aaaa, this run bbbb",
    ]
    warnings, mismatches = explain_provenance(PROV, {**PROV, "cache_fingerprint": "c2", "extra": 1})
    assert mismatches == ["cache_fingerprint differs: baseline c1, this run c2 "
                          "(the cached activations (data, seed or length) changed)"]
    assert warnings == ["extra differs: baseline None, this run 1"]
    warnings, mismatches = explain_provenance({k: v for k, v in PROV.items() if k != "model_fingerprint"}, PROV)
    assert mismatches == [] and warnings[0].startswith("model_fingerprint is not recorded for the baseline")


def test_compare_explains_a_hard_mismatch_instead_of_comparing(tmp_path):
    seed(tmp_path, {cid(): metrics(), cid(rank=8): metrics()})
    s = store(tmp_path, hint="pytest --update-baselines")
    (msg,) = s.compare(cid(), metrics(0.5), TH, provenance={**PROV, "model_fingerprint": "m2"})
    assert msg.startswith(f"{cid()}: baseline in ") and "is not comparable: model_fingerprint differs" in msg
    assert msg.endswith("re-record it with pytest --update-baselines")
    assert s.compare(cid(), metrics(), TH, provenance={**PROV, "device": "cpu"}) == []
    assert s.provenance_warnings([cid(), cid(rank=8), cid(rank=4)], {**PROV, "device": "cpu"}) == [
        "device differs: baseline NVIDIA H100, this run cpu"
    ]


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    assert git_commit(tmp_path / "missing") is None


# ---------------------------------------------------------------- bad files


BAD = [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 2, "provenance": {}, "cases": {}}', "schema_version 2 is not 1"),
    ("[]", "schema_version None is not 1"),
    ('{"schema_version": 1, "cases": {}}', "'provenance' and 'cases' must both be objects"),
    ('{"schema_version": 1, "provenance": {}, "cases": {"layer0-x": {"nmse": NaN, "provenance": "p"}}}',
     "NaN is not valid JSON"),
    ('{"schema_version": 1, "provenance": {}, "cases": {"layer0-x": {"nmse": 1}}}', "no valid 'provenance' reference"),
    ('{"schema_version": 1, "provenance": {"p": {}}, "cases": {"layer1-x": {"nmse": 1, "provenance": "p"}}}',
     "does not belong to layer 0"),
    ('{"schema_version": 1, "provenance": {"p": {}}, "cases": {"layer0-x": {"nmse": "1", "provenance": "p"}}}',
     "nmse is not a number"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[e for _, e in BAD])
def test_bad_file_is_one_line_naming_file_and_fix(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baselines" / MID).mkdir(parents=True)
    (tmp_path / "baselines" / MID / "layer0.json").write_text(text)
    with pytest.raises(HarnessError) as info:
        store(tmp_path, hint="pytest --update-baselines").get(cid())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"baselines/{MID}/layer0.json: bad baseline file: ")
    assert expected in msg and msg.endswith("regenerate it with pytest --update-baselines")


def test_update_replaces_an_unreadable_file(tmp_path):
    path = tmp_path / "baselines" / MID / "layer0.json"
    path.parent.mkdir(parents=True)
    path.write_text("{garbage")
    s = store(tmp_path, update=True)
    assert s.stale(set()) == []  # unreadable: nothing stored
    s.record(cid(), metrics())
    summary = s.flush(PROV)
    assert summary.added == [cid()] and summary.replaced == [path]
    assert store(tmp_path).get(cid()) == metrics()


def test_summary_lines_are_capped():
    summary = UpdateSummary(added=[f"layer0-a{i}" for i in range(15)], changed=["layer1-b"],
                            details={"layer1-b": "nmse 1 -> 2"}, files=["f"])
    lines = summary.lines(max_ids=3)
    assert lines[0] == "baselines: 15 added, 1 changed, 0 refreshed, 0 unchanged, 0 skipped, 0 deleted; 1 file(s) updated"
    assert lines[1:] == ["  added: layer0-a0", "  added: layer0-a1", "  added: layer0-a2",
                         "  ... and 12 more added", "  changed: layer1-b (nmse 1 -> 2)"]
