"""Tests of the pytest plugin itself (issue 5, item 6), with pytester.

One demo model (qwen3, 2 layers: 2 x 7 = 14 projections) and one tiny save_xy cache are
built per module; most runs pass --xy-path so nothing is re-captured, and run in-process
(pytester.runpytest). Only the xdist run needs a subprocess.

In-process runs: pytester removes, after every run, the modules first imported during it.
Everything the harness imports is imported here first, so those modules (torch and
transformers above all) stay loaded and keep one identity across runs.
"""

import gc
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

import tokenwise_harness.cache  # noqa: F401
import tokenwise_harness.calib.smooth  # noqa: F401
import tokenwise_harness.engine  # noqa: F401
import tokenwise_harness.numerics.metrics  # noqa: F401
import tokenwise_harness.numerics.svdq  # noqa: F401
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.run  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401  (see the module docstring)
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tokenwise_harness.allowlist import PROJ_ORDER
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.demo.models import make_demo_model
from tokenwise_harness.report import document as report
from tokenwise_harness.verdict.baselines import model_id
from tokenwise_harness.verdict.cases import parse_case_id

pytest_plugins = ["pytester"]

GRID = ["--ranks", "8,16", "--qspecs", "nvfp4@16"]
CFGS = ["rank8-nvfp4-blk16", "rank16-nvfp4-blk16"]
BLOCK = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJ_ORDER}
# xy capture options small enough for a few seconds on a CPU (tokens: (2 + 2) x 16).
XY_SMALL = ["--xy-cn", "2", "--xy-eu", "2", "--xy-length", "16"]


def case_ids(layers=(0, 1), projs=PROJ_ORDER, cfgs=CFGS) -> set[str]:
    return {f"layer{layer}-{BLOCK[p]}-{p}-{cfg}" for layer in layers for p in projs for cfg in cfgs}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_demo")
    model = make_demo_model("qwen3", root / "qwen3", num_layers=2)
    cache = save_xy(model, root / "cache", "c", cn=2, eu=2, length=16, progress=False, log=lambda m: None)
    mdir = ModelDir(model)
    # Every in-process run ends in pytest's gc.collect() calls (unraisable-exception hook),
    # which walk the whole heap, torch and transformers included: freeze what exists now.
    gc.collect()
    gc.freeze()
    yield SimpleNamespace(model=model, cache=Path(cache), model_id=model_id(mdir.name, mdir.fingerprint))
    gc.unfreeze()


@pytest.fixture
def harness(pytester, demo):
    """run(*args): an in-process harness run on the demo model and cache with GRID."""

    def run(*args, grid=GRID):
        return pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *grid, *args)

    run.baselines = pytester.path / "baselines" / demo.model_id
    return run


def collected(result) -> list[str]:
    """The case ids a `--co -q` run lists."""
    return [line.split("::", 1)[1] for line in result.outlines if line.startswith("tokenwise::")]


def output(result) -> str:
    return "\n".join(result.outlines)


def failure_text(result, case_id: str) -> str:
    """The text pytest's FAILURES section shows for one case (under its `___ id ___` header)."""
    out = result.outlines
    start = next(i for i, line in enumerate(out) if line.strip("_ ") == case_id and line.startswith("_"))
    lines = []
    for line in out[start + 1:]:
        if line.startswith("___") or line.startswith("==="):
            break
        lines.append(line)
    return "\n".join(lines)


def read_layer(path: Path) -> dict:
    return json.loads(path.read_text())


def write_layer(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def plant_ghost_baseline(baselines: Path, source_case: str, layer: int) -> str:
    """Copy a stored case to a layer the model does not have (in the same format); its id."""
    src_layer = int(source_case.split("-")[0][len("layer"):])
    doc = read_layer(baselines / f"layer{src_layer}.json")
    entry = doc["cases"][source_case]
    ghost = f"layer{layer}-" + source_case.split("-", 1)[1]
    write_layer(baselines / f"layer{layer}.json",
                {"schema_version": 1, "provenance": {entry["provenance"]: doc["provenance"][entry["provenance"]]},
                 "cases": {ghost: entry}})
    return ghost


# ---------------------------------------------------------------- 1. collection


def test_collection_counts_and_k_selection(pytester, harness):
    result = harness("--co", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert sorted(collected(result)) == sorted(case_ids())  # 2 layers x 7 projections x 2 configs
    assert len(collected(result)) == 28

    for expr, expected in [
        ("q_proj", case_ids(projs=["q_proj"])),
        ("layer1- and nvfp4", case_ids(layers=[1])),
        ("rank16 and mlp", case_ids(projs=["gate_proj", "up_proj", "down_proj"], cfgs=["rank16-nvfp4-blk16"])),
    ]:
        result = harness("--co", "-q", "-k", expr)
        assert sorted(collected(result)) == sorted(expected), expr
        result.stdout.fnmatch_lines([f"{len(expected)}/28 tests collected ({28 - len(expected)} deselected)*"])
    assert len(expected) == 6


def test_cases_carry_no_unknown_marker_without_xdist(pytester, demo):
    """Every case is marked xdist_group; with xdist off (-p no:xdist, plugin autoload off) that
    marker must still be known: no PytestUnknownMarkWarning, and --strict-markers accepts it.
    (A subprocess: in-process runs share pytest's set of known markers with this session's.)"""
    result = pytester.runpytest_subprocess(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID,
                                           "-p", "no:xdist", "--strict-markers", "--co", "-q")
    assert result.ret == pytest.ExitCode.OK, output(result)
    assert len(collected(result)) == 28 and "Unknown pytest.mark" not in output(result)


def test_grid_mode_full_adds_quant_only_and_rank_only(harness):
    ids = set(collected(harness("--co", "-q", "--grid-mode", "full")))
    extra = case_ids(cfgs=["rank0-nvfp4-blk16", "rank8-none-blknone", "rank16-none-blknone"])
    assert ids == case_ids() | extra
    assert len(ids) == 14 * 5


def test_nothing_added_without_harness_options(pytester, harness):
    # A harness run first: the next in-process run has a fresh config and must not see it.
    assert len(collected(harness("--co", "-q", "-k", "q_proj"))) == 4
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = pytester.runpytest("--co", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert [line for line in result.outlines if "::" in line] == ["test_plain.py::test_one"]
    assert "tokenwise" not in output(result)
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=1)
    assert "tokenwise" not in output(result)


# ---------------------------------------------------------------- 2. thresholds


def test_thresholds_fail_exactly_the_matching_cases(pytester, harness):
    pytester.makefile(".yaml", thresholds="rules:\n  - match: {proj: q_proj}\n    limits: {nmse: 1.0e-9}\n")
    # --update-baselines: no baseline exists yet, and a missing one must not hide the limits.
    result = harness("--update-baselines")
    result.assert_outcomes(passed=24, failed=4)
    failed = {line.split("::", 1)[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED")}
    assert failed == case_ids(projs=["q_proj"])
    text = output(result)
    for cid in sorted(failed):
        # names the case, the metric, its value, the limit and the rule that set it
        reason = failure_text(result, cid)
        assert reason.startswith("nmse = ") and reason.endswith(
            "> limit 1e-09 (thresholds.yaml rules[0]: proj q_proj)"), text

    # Generous limits (and sqnr_db, the one lower bound) pass against the baselines just made.
    pytester.makefile(".yaml", thresholds="defaults: {nmse: 0.5, token_rel_l2_max: 5.0, sqnr_db: 3}\n")
    harness().assert_outcomes(passed=28)
    # A lower bound that is too high fails every case, saying `<`.
    pytester.makefile(".yaml", thresholds="defaults: {sqnr_db: 60}\n")
    result = harness("-k", "layer0-self_attn-v_proj-rank8")
    result.assert_outcomes(failed=1)
    reason = failure_text(result, "layer0-self_attn-v_proj-rank8-nvfp4-blk16")
    assert reason.startswith("sqnr_db = ") and reason.endswith("< limit 60 (thresholds.yaml defaults)")


# ---------------------------------------------------------------- 3. baselines


def test_baselines_missing_create_pass_regress(pytester, harness, demo):
    result = harness("-k", "q_proj")
    result.assert_outcomes(failed=4)
    text = output(result)
    # each case: "no baseline" as its outcome, nothing repeated; the session: one message
    for cid in case_ids(projs=["q_proj"]):
        assert failure_text(result, cid) == "no baseline"
        assert f"NO BASELINE tokenwise::{cid} - no baseline" in result.outlines  # short summary
    assert text.count(f"baselines/{demo.model_id}") == 2, text  # the header and the one message
    message = result.outlines.index(
        f"tokenwise: 4 cases of 4 have no baseline in baselines/{demo.model_id}/; create them (existing baselines "
        "are kept) with:")
    command = result.outlines[message + 1].strip()
    assert (f"--model-dir={demo.model} --xy-path={demo.cache} --ranks 8,16 --qspecs nvfp4@16 -k q_proj "
            in command) and command.endswith(" --update-baselines-new")
    assert result.outlines[message + 2].startswith("=") and "4 failed" in result.outlines[message + 2]
    verbose = harness("-k", "q_proj and layer1", "-v")
    verbose.assert_outcomes(failed=2)
    assert sum(bool(re.search(r" NO BASELINE +\[ *\d+%\]$", line)) for line in verbose.outlines) == 2, output(verbose)
    report_path = pytester.path / "nobase.json"
    harness("-k", "q_proj and layer0", f"--tokenwise-report={report_path}")
    verdicts = {v["verdict"] for v in report.load_report(report_path)["cases"].values()}
    assert verdicts == {"no baseline"}

    result = harness("-k", "q_proj", "--update-baselines")
    result.assert_outcomes(passed=4)
    assert "baselines: 4 added, 0 changed" in output(result)
    assert sorted(p.name for p in harness.baselines.iterdir()) == ["layer0.json", "layer1.json"]
    assert set(read_layer(harness.baselines / "layer1.json")["cases"]) == case_ids(layers=[1], projs=["q_proj"])
    harness("-k", "q_proj").assert_outcomes(passed=4)
    # an update that changes nothing writes nothing
    result = harness("-k", "q_proj", "--update-baselines")
    assert "0 added, 0 changed, 0 refreshed, 4 unchanged, 0 skipped, 0 deleted; 0 file(s) updated" in output(result)

    # A stored nmse far below this run's: a regression naming the baseline and the tolerance.
    layer0 = harness.baselines / "layer0.json"
    doc = read_layer(layer0)
    doc["cases"]["layer0-self_attn-q_proj-rank8-nvfp4-blk16"]["nmse"] = 1e-4
    write_layer(layer0, doc)
    result = harness("-k", "q_proj")
    result.assert_outcomes(passed=3, failed=1)
    line = failure_text(result, "layer0-self_attn-q_proj-rank8-nvfp4-blk16")
    assert line.startswith("nmse = ")
    assert line.endswith("> 0.000105 allowed by baseline 0.0001 (rtol 0.05, atol 1e-09: built-in defaults)")

    # --update-baselines-new creates the missing k_proj baselines, keeps the edited q_proj one,
    # and still gates the cases that have a baseline.
    result = harness("-k", "q_proj or k_proj", "--update-baselines-new")
    result.assert_outcomes(passed=7, failed=1)
    assert "baselines: 4 added, 0 changed, 0 refreshed, 0 unchanged, 4 skipped" in output(result)
    doc = read_layer(layer0)
    assert doc["cases"]["layer0-self_attn-q_proj-rank8-nvfp4-blk16"]["nmse"] == 1e-4
    assert "layer0-self_attn-k_proj-rank16-nvfp4-blk16" in doc["cases"]

    # --update-baselines rewrites it and says what changed
    result = harness("-k", "q_proj", "--update-baselines")
    result.assert_outcomes(passed=4)
    assert "changed: layer0-self_attn-q_proj-rank8-nvfp4-blk16 (nmse 0.0001 -> " in output(result)
    harness("-k", "q_proj or k_proj").assert_outcomes(passed=8)


def test_missing_baselines_command_works_when_pasted(pytester, demo):
    """The printed command, run as printed (a shell, from the same directory), creates exactly the
    missing baselines of the same selection -- -k kept, a path option given with a space put
    in = form, a -k expression with spaces quoted -- after which the original run passes."""
    import subprocess

    args = [f"--model-dir={demo.model}", "--xy-path", str(demo.cache), "--ranks", "8,16", "--qspecs", "nvfp4@16",
            "-k", "layer0-self_attn-q_proj-rank8-nvfp4 or layer1-mlp-up_proj-rank16", "--baselines-dir", "elsewhere",
            "--grid-mode", "full", "--rootdir", str(pytester.path)]  # --rootdir: the space form is then harmless
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=3)  # layer1 up_proj: rank16 x nvfp4@16 and rank16 alone
    selected = {line.split("::", 1)[1].split(" ")[0] for line in result.outlines
                if line.startswith("NO BASELINE tokenwise::")}
    assert len(selected) == 3
    message = next(i for i, line in enumerate(result.outlines) if line.startswith("tokenwise: 3 cases of 3 have no"))
    assert f"no baseline in elsewhere/{demo.model_id}/;" in result.outlines[message]
    command = result.outlines[message + 1].strip()
    assert f"--xy-path={demo.cache}" in command and "--baselines-dir=elsewhere" in command
    assert "-k 'layer0-self_attn-q_proj-rank8-nvfp4 or layer1-mlp-up_proj-rank16'" in command
    assert not (pytester.path / "elsewhere").exists()

    proc = subprocess.run(command, shell=True, cwd=pytester.path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stored = {cid for f in (pytester.path / "elsewhere" / demo.model_id).iterdir() for cid in read_layer(f)["cases"]}
    assert stored == selected
    pytester.runpytest(*args).assert_outcomes(passed=3)


def test_stale_baselines_judged_within_selection_and_deleted_on_update(pytester, harness):
    harness("-k", "q_proj", "--update-baselines").assert_outcomes(passed=4)
    # A baseline of a case that no longer exists (the model has no layer 7), in the same format.
    ghost = plant_ghost_baseline(harness.baselines, "layer0-self_attn-q_proj-rank8-nvfp4-blk16", layer=7)
    stale_line = "baselines stale (no such case any more; --update-baselines deletes them): 1"

    result = harness("-k", "q_proj")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([stale_line, f"  {ghost}"])
    # outside the selection (-k), or outside the grid (--ranks), it is not judged
    for args, grid in ((["-k", "layer0 and q_proj"], GRID), (["-k", "k_proj", "--update-baselines"], GRID),
                       (["-k", "q_proj"], ["--ranks", "16", "--qspecs", "nvfp4@16"])):
        result = harness(*args, grid=grid)
        assert "baselines stale" not in output(result), args
        assert "baselines deleted" not in output(result), args
    assert (harness.baselines / "layer7.json").is_file()

    result = harness("-k", "q_proj", "--update-baselines")
    result.stdout.fnmatch_lines(["baselines: 0 added, 0 changed, 0 refreshed, 4 unchanged, 0 skipped, 1 deleted; *",
                                 f"  deleted: {ghost}", "baselines deleted: 1", f"  {ghost}"])
    assert not (harness.baselines / "layer7.json").exists()  # its only case went: the file went
    assert "baselines stale" not in output(harness("-k", "q_proj"))


def test_provenance_mismatch_explained_benign_difference_warned(pytester, harness):
    harness("-k", "layer0 and self_attn", "--update-baselines").assert_outcomes(passed=8)
    layer0 = harness.baselines / "layer0.json"
    doc = read_layer(layer0)
    (ref,) = doc["provenance"]
    mine = doc["provenance"][ref]["model_fingerprint"]
    # k_proj rank8 recorded "for another model"; v_proj rank8 under another torch version
    for cid, key, value in (("layer0-self_attn-k_proj-rank8-nvfp4-blk16", "model_fingerprint", "0" * 64),
                            ("layer0-self_attn-v_proj-rank8-nvfp4-blk16", "torch_version", "1.0.0")):
        doc["provenance"][key] = {**doc["provenance"][ref], key: value}
        doc["cases"][cid]["provenance"] = key
    write_layer(layer0, doc)

    result = harness("-k", "layer0 and self_attn")
    result.assert_outcomes(passed=7, failed=1)
    text = output(result)
    reason = failure_text(result, "layer0-self_attn-k_proj-rank8-nvfp4-blk16")
    assert reason.startswith(f"baseline in baselines/{harness.baselines.name}/layer0.json "
                             f"is not comparable: model_fingerprint differs: baseline {'0' * 64}, this run {mine} "
                             "(the model's weights changed); re-record it with `"), text
    assert " -k 'layer0 and self_attn' " in reason and reason.endswith(" --update-baselines`"), reason
    assert "warning: torch_version differs: baseline 1.0.0, this run " in text


# ---------------------------------------------------------------- 4. the artifact


def test_the_session_never_changes_a_cached_spec(pytester, harness, demo):
    """A variant's EvalSpec is made once, before the cache is known, and shared (validation, baselines,
    provenance); its Evaluation reads the session's cache through a copy with that cache's path and the
    same validated ModelDir, so the cached spec stays as made."""
    pytester.makeconftest(
        """
        import json

        def pytest_sessionfinish(session):
            hs = session.config.pluginmanager.get_plugin("tokenwise-session")
            seen = []
            for variant, spec in hs._specs.items():
                ev = hs.evaluation(variant)
                seen.append(dict(cached=spec.xy_path, evaluation=ev.spec.xy_path, cache=str(hs.cache.path),
                                 copy=ev.spec is not spec, one_mdir=ev.mdir is spec.mdir is hs.model_dir(variant)))
            with open("specs.json", "w") as fh:
                json.dump(seen, fh)
        """
    )
    harness("-k", "layer0-self_attn-q_proj-rank8", "--update-baselines").assert_outcomes(passed=1)
    seen = json.loads((pytester.path / "specs.json").read_text())
    assert seen == [dict(cached="", evaluation=str(demo.cache), cache=str(demo.cache), copy=True, one_mdir=True)]


def test_report_artifact_and_summary_table(pytester, harness, demo):
    pytester.makefile(".yaml", thresholds="defaults: {nmse: 0.5}\nrules:\n"
                      "  - match: {proj: down_proj, rank: 8}\n    limits: {nmse: 1.0e-9}\n")
    harness("--update-baselines")
    # into a directory that does not exist yet (created at the end, as --junitxml does)
    result = harness("--tokenwise-report", "out/r.json")
    result.assert_outcomes(passed=26, failed=2)
    rep = report.load_report(pytester.path / "out" / "r.json")  # validates the §2.5 schema
    report.validate_report(rep)

    meta = rep["meta"]
    assert meta["xy_path"] == str(demo.cache) and meta["grid_mode"] == "combined"
    assert meta["ranks"] == [8, 16] and meta["qspecs"] == [["nvfp4", "16"]] and meta["smooth"] is False
    assert meta["xy_meta"]["cn"] == "2" and meta["chunk_tokens"] == 4096
    cfg_keys = ["rank=8;fmt=nvfp4;blk=16", "rank=16;fmt=nvfp4;blk=16"]
    assert sorted(rep["by_layer"]) == ["0", "1"]
    for layer in rep["by_layer"].values():
        assert list(layer) == ["self_attn", "mlp"]
        for block, projs in (("self_attn", PROJ_ORDER[:4]), ("mlp", PROJ_ORDER[4:])):
            assert list(layer[block]["by_proj"]) == list(projs)
            for per_cfg in layer[block]["by_proj"].values():
                assert list(per_cfg) == cfg_keys
                assert all(m["n_tokens"] == 64 and 0 < m["nmse"] < 0.05 for m in per_cfg.values())
            assert {k: v["n_proj"] for k, v in layer[block]["agg"].items()} == dict.fromkeys(cfg_keys, len(projs))

    cases = rep["cases"]
    assert set(cases) == case_ids()
    down = cases["layer1-mlp-down_proj-rank8-nvfp4-blk16"]
    assert down["verdict"] == "failed" and down["config"] == "rank=8;fmt=nvfp4;blk=16"
    assert down["limits"] == {"nmse": {"limit": 1e-9, "rule": "rules[0]: proj down_proj, rank 8"}}
    assert down["baseline"]["nmse"] == rep["by_layer"]["1"]["mlp"]["by_proj"]["down_proj"][cfg_keys[0]]["nmse"]
    q = cases["layer0-self_attn-q_proj-rank16-nvfp4-blk16"]
    assert q["verdict"] == "passed" and q["limits"] == {"nmse": {"limit": 0.5, "rule": "defaults"}}
    assert sorted(c for c, v in cases.items() if v["verdict"] == "failed") == sorted(
        case_ids(projs=["down_proj"], cfgs=["rank8-nvfp4-blk16"]))

    # the closing table: the failing cases, then the worst passing ones, each with its nmse,
    # limit, baseline and change; capped, pointing at -rA and the report
    out = result.outlines
    rows = table_rows(result)
    assert [r["verdict"] for r in rows] == ["failed"] * 2 + ["passed"] * 10
    for r in rows:
        c = cases[r["case"]]
        nmse = rep_nmse(rep, r["case"])
        assert float(r["nmse"]) == pytest.approx(nmse, rel=1e-3)
        assert float(r["limit"]) == c["limits"]["nmse"]["limit"]
        assert float(r["baseline"]) == pytest.approx(c["baseline"]["nmse"], rel=1e-3)
        assert r["change"] == "+0.0%"
    passing = [float(r["nmse"]) for r in rows[2:]]
    assert passing == sorted(passing, reverse=True)
    assert min(passing) >= sorted(rep_nmse(rep, cid) for cid in cases if cases[cid]["verdict"] == "passed")[-10] * 0.999
    assert "... 16 more passing cases (-rA or -v lists all)" in out
    assert f"report: {pytester.path / 'out' / 'r.json'}" in out
    head = out.index(next(x for x in out if "tokenwise precision" in x))
    assert all(len(line) < 80 for line in out[head + 1: head + 15])  # fitted to pytester's 80 columns

    # -rA and -v list every case; a wide terminal shows whole case ids
    for flag in ("-rA", "-v"):
        assert len(table_rows(harness(flag))) == 28, flag
    pytester._monkeypatch.setenv("COLUMNS", "160")
    assert {r["case"] for r in table_rows(harness("-rA"), shortened=False)} == case_ids()


def table_rows(result, shortened=True) -> list[dict]:
    """The closing table's rows as dicts (case: the full case id the row names)."""
    out = result.outlines
    head = out.index(next(x for x in out if "tokenwise precision" in x)) + 1
    assert out[head].split() == ["case", "nmse", "limit", "baseline", "change", "verdict"]
    rows = []
    for line in out[head + 1:]:
        words = line.split()
        if len(words) < 6 or not words[0].startswith("layer"):
            break
        full = [cid for cid in case_ids() if words[0] in (
            (cid, cid.replace("-self_attn-", "-").replace("-mlp-", "-"),
             cid.replace("-self_attn-", "-").replace("-mlp-", "-").replace("_proj-", "-")) if shortened else (cid,))]
        assert len(full) == 1, words[0]
        rows.append(dict(zip(["case", "nmse", "limit", "baseline", "change"], [full[0]] + words[1:5]),
                         verdict=" ".join(words[5:])))
    return rows


def rep_nmse(rep: dict, case_id: str) -> float:
    layer, block, proj = case_id.split("-")[:3]
    cfg = next(c for c in rep["meta"]["configs"] if case_id.endswith(
        "-rank{}-{}-blk{}".format(*[kv.split("=")[1] for kv in c.split(";")])))
    return rep["by_layer"][layer[len("layer"):]][block]["by_proj"][proj][cfg]["nmse"]


# ---------------------------------------------------------------- 5. xdist


def test_xdist_merged_report_equals_serial(pytester, harness, demo):
    pytester.makeconftest(
        """
        import json

        def pytest_runtest_logreport(report):
            node = getattr(report, "node", None)  # set on the xdist controller
            if report.when == "call" and node is not None:
                with open("workers.jsonl", "a") as fh:
                    fh.write(json.dumps([report.nodeid, node.gateway.id]) + "\\n")
        """
    )
    harness("--update-baselines").assert_outcomes(passed=28)
    serial = harness("--tokenwise-report", "serial.json")
    serial.assert_outcomes(passed=28)
    # one stale baseline, to be judged (and deleted) by the controller, which collects nothing
    plant_ghost_baseline(harness.baselines, "layer1-mlp-up_proj-rank16-nvfp4-blk16", layer=9)

    result = pytester.runpytest_subprocess(
        "-n", "2", f"--model-dir={demo.model}", f"--xy-path={demo.cache}",
        *GRID, "--tokenwise-report", "xdist.json", "--update-baselines", "-p", "no:cacheprovider", "-v", timeout=180)
    result.assert_outcomes(passed=28)
    text = output(result)
    assert "scheduling tests via TokenwiseScheduling" in text  # -n alone groups by input
    # Every metric equal to the serial run's, bit for bit: the baselines it rewrote are unchanged.
    assert "baselines: 0 added, 0 changed, 0 refreshed, 28 unchanged, 0 skipped, 1 deleted" in text
    assert "baselines deleted: 1" in text and not (harness.baselines / "layer9.json").exists()

    a = report.load_report(pytester.path / "serial.json")
    b = report.load_report(pytester.path / "xdist.json")
    assert report.comparable(a) == report.comparable(b)
    assert (pytester.path / "serial.json").read_bytes() == (pytester.path / "xdist.json").read_bytes()

    # all cases of an input group ran on one worker (the seed layout with checksums: q/k/v read one
    # X, gate/up another, o and down their own: 4 groups a layer)
    runs = [json.loads(line) for line in (pytester.path / "workers.jsonl").read_text().splitlines()]
    assert len(runs) == 28
    cache = XYCache(demo.cache)
    workers: dict[str, set] = {}
    for nodeid, worker in runs:
        case = parse_case_id(nodeid.split("::", 1)[1].split("@")[0])
        workers.setdefault(cache.entry(case.target).x_key, set()).add(worker)
    assert len(workers) == 8 and all(len(w) == 1 for w in workers.values()), workers
    assert set().union(*workers.values()) == {"gw0", "gw1"}


def test_xdist_scheduler_groups_by_input_and_respects_an_explicit_dist(pytester, demo):
    from tokenwise_harness.pytest_plugin.xdist import _dist_given, input_group

    seed = XYCache(demo.cache)
    compact = XYCache(save_xy(demo.model, pytester.path / "compact", "c", cn=1, eu=1, length=4, compact=True,
                              progress=False, log=lambda m: None))
    for cache in (seed, compact):
        q8 = input_group("tokenwise::layer0-self_attn-q_proj-rank8-nvfp4-blk16", cache)
        assert q8 == "tokenwise:model.layers.0.self_attn.q_proj.X"
        # xdist's `@group` suffix (when a pytest keeps it) changes nothing
        assert input_group("tokenwise::layer0-self_attn-q_proj-rank16-nvfp4-blk16@model.layers.0.self_attn.q_proj",
                           cache) == q8
        assert input_group("tokenwise::layer0-self_attn-q_proj-rank8-nvfp4-blk16-smooth", cache) != q8
        assert input_group("tokenwise::layer0-self_attn-o_proj-rank8-nvfp4-blk16", cache) != q8
        assert input_group("tokenwise::layer1-self_attn-q_proj-rank8-nvfp4-blk16", cache) != q8
        assert input_group("tests/test_x.py::test_a", cache) is None
    # both layouts: q/k/v share one group, gate/up another (the compact layout stores their X once;
    # the seed layout stores it per projection under one checksum, which the cache reads once)
    k8, v8 = ("tokenwise::layer0-self_attn-k_proj-rank8-nvfp4-blk16", "tokenwise::layer0-self_attn-v_proj-rank8-nvfp4-blk16")
    gate, up = ("tokenwise::layer1-mlp-gate_proj-rank8-nvfp4-blk16", "tokenwise::layer1-mlp-up_proj-rank8-nvfp4-blk16")
    for cache in (seed, compact):
        assert input_group(k8, cache) == input_group(v8, cache) == q8
        assert input_group(gate, cache) == input_group(up, cache) != input_group(
            "tokenwise::layer1-mlp-down_proj-rank8-nvfp4-blk16", cache)
    for args, given in ((["-n", "2"], False), (["-n", "2", "--dist", "load"], True),
                        (["-n", "2", "--dist=worksteal"], True), (["-n", "2", "-d"], True)):
        assert _dist_given(pytester.parseconfig(*args)) is given, args


# ---------------------------------------------------------------- 6. junitxml


def test_junitxml_carries_metrics_as_properties(pytester, harness):
    pytester.makefile(".yaml", thresholds="rules:\n  - match: {layer: 1}\n    limits: {nmse: 1.0e-9}\n")
    result = harness("-k", "q_proj", "--update-baselines", "--junitxml", "j.xml", "--tokenwise-report", "r.json")
    result.assert_outcomes(passed=2, failed=2)
    rep = report.load_report(pytester.path / "r.json")
    cases = ET.parse(pytester.path / "j.xml").getroot().findall(".//testcase")
    assert sorted(tc.get("name") for tc in cases) == sorted(case_ids(projs=["q_proj"]))
    for tc in cases:
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        layer = tc.get("name")[len("layer")]
        cfg = "rank=8;fmt=nvfp4;blk=16" if "rank8-" in tc.get("name") else "rank=16;fmt=nvfp4;blk=16"
        metrics = rep["by_layer"][layer]["self_attn"]["by_proj"]["q_proj"][cfg]
        for name in ("nmse", "sqnr_db", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
                     "token_rel_l2_max", "sse", "denom", "n_tokens"):
            assert float(props[name]) == metrics[name], (tc.get("name"), name)
        payload = json.loads(props["tokenwise_case"])
        assert payload["case_id"] == tc.get("name")
        assert payload["verdict"] == ("failed" if layer == "1" else "passed")
        assert (tc.find("failure") is not None) == (layer == "1")


# ---------------------------------------------------------------- 7. --quantizer


KERNELS = '''
import torch
from tokenwise_harness.numerics import svdq

def good(model, cfg):
    svdq.fake_op(model, cfg)

@torch.no_grad()
def broken(model, cfg):
    """The right kernel, then half of every allowlisted weight's input columns zeroed."""
    svdq.fake_op(model, cfg)
    for name, module in model.named_modules():
        if ".layers." in name and name.endswith("_proj"):
            module.weight[:, : module.weight.shape[1] // 2] = 0
'''


def test_quantizer_broken_kernel_fails_correct_kernel_passes(pytester, harness):
    pytester.makepyfile(user_kernels=KERNELS)
    pytester.syspathinsert()
    harness("-k", "layer0", "--update-baselines").assert_outcomes(passed=14)  # with our own kernel

    result = harness("-k", "layer0", "--quantizer", "user_kernels:broken")
    result.assert_outcomes(failed=14)
    reason = failure_text(result, "layer0-mlp-up_proj-rank8-nvfp4-blk16")
    assert reason.startswith("nmse = ") and "allowed by baseline" in reason

    result = harness("-k", "layer0", "--quantizer", "user_kernels:good")
    result.assert_outcomes(passed=14)
    assert ("warning: quantizer differs: baseline tokenwise_harness.numerics.svdq:fake_op, this run user_kernels:good"
            in output(result))
    # different configs selected for different weights: each is computed (once per config)
    result = harness("-k", "layer0-self_attn-q_proj-rank8 or layer0-self_attn-k_proj-rank16",
                     "--quantizer", "user_kernels:good")
    result.assert_outcomes(passed=2)


# ---------------------------------------------------------------- 8. usage errors


@pytest.mark.parametrize(
    "args, files, needle",
    [
        (["--qspecs", "nvfp9@16"], {}, "--qspecs: qspec 'nvfp9@16' has unknown format 'nvfp9'"),
        (["--qspecs", "nvfp4@0"], {}, "--qspecs: qspec 'nvfp4@0' has block '0'"),
        (["--ranks", "8,x"], {}, "--ranks: 'x' is not an integer rank"),
        (["--ranks=8,-3"], {}, "--ranks: rank -3 is negative"),
        (["--grid-mode", "half"], {}, "--grid-mode 'half' is unknown"),
        (["--chunk-tokens", "0"], {}, "--chunk-tokens 0 must be positive"),
        (["--model-dir", "no_such_model"], {}, "--model-dir no_such_model does not exist"),
        (["--xy-path", "no_such.safetensors"], {}, "--xy-path no_such.safetensors does not exist"),
        (["--thresholds", "missing.yaml"], {}, "--thresholds: missing.yaml does not exist"),
        ([], {"thresholds.yaml": "rules:\n  - match: {proj: x_proj}\n    limits: {nmse: 1}\n"},
         "thresholds.yaml: rules[0].match.proj: unknown projection 'x_proj'"),
        ([], {"thresholds.yaml": "defaults: {nmse: [\n"}, "thresholds.yaml: not valid YAML"),
        ([], {"thresholds.yaml": "defaults: {nmse: 0.1, nmse: 0.2}\n"}, "duplicate key 'nmse'"),
        (["--quantizer", "no_such_module:fn"], {}, "--quantizer 'no_such_module:fn': cannot import"),
        (["--quantizer", "os.path"], {}, "--quantizer 'os.path' must look like package.module:function"),
        (["--tokenwise-report", "a_file/r.json"], {"a_file": "x"}, "--tokenwise-report: "),
        (["--device", "tpu"], {}, "--device 'tpu' is unknown"),
    ],
)
def test_usage_errors(pytester, demo, args, files, needle):
    for name, text in files.items():
        (pytester.path / name).write_text(text)
    base = [f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID]
    # later occurrences of an option win: args override the defaults above
    result = pytester.runpytest(*base, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output(result)
    errors = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and needle in errors[0], result.errlines
    assert "INTERNALERROR" not in output(result) + "\n".join(result.errlines)
    assert "Traceback" not in output(result) + "\n".join(result.errlines)


def test_xy_path_without_model_dir_is_a_usage_error(pytester, demo):
    result = pytester.runpytest(f"--xy-path={demo.cache}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.errlines[0] == ("ERROR: tokenwise: --xy-path needs --model-dir (or --smooth-model-dir) "
                                  "for the weights to score")


def test_path_option_value_that_moves_the_rootdir_is_a_usage_error(pytester, demo):
    # pytest picks the rootdir before it knows plugin options, so it takes the value of
    # `--model-dir /elsewhere/qwen3` for a test path: thresholds.yaml and baselines/ of this
    # directory would silently not be used.
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest("--model-dir", str(demo.model), f"--xy-path={demo.cache}", *GRID)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (error,) = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert f"pytest took the value of `--model-dir {demo.model}` for a test path" in error
    assert f"instead of {pytester.path} (ini file {pytester.path / 'tox.ini'}); write --model-dir={demo.model}" in error
    # with '=', or as a path below the rootdir, the same run is fine
    assert len(collected(pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID,
                                            "--co", "-q"))) == 28
    shutil.copytree(demo.model, pytester.path / "m")
    result = pytester.runpytest("--model-dir", "m", f"--xy-path={demo.cache}", *GRID, "--co", "-q")
    assert len(collected(result)) == 28


def test_error_while_scoring_fails_that_case_in_one_line(pytester, harness):
    # rank 100 > min(out, in) = 64 of q_proj: known only once the weight is read
    result = harness("-k", "layer0-self_attn-q_proj", "--update-baselines", grid=["--ranks", "8,100", *GRID[2:]])
    result.assert_outcomes(failed=2)
    text = output(result)
    assert "--ranks: rank 100 exceeds min(out, in) = 64 of model.layers.0.self_attn.q_proj" in text
    assert "UsageError" not in text and "Traceback" not in text and "INTERNALERROR" not in text


# ---------------------------------------------------------------- 9. captured cache


def test_cache_captured_once_reused_and_refreshed(pytester, monkeypatch):
    """The shared user cache (here $TOKENWISE_CACHE_DIR): captured once, reused, and a changed
    model's old entry dropped, while an entry of another dir's model of the same name stays."""
    model = make_demo_model("qwen3", pytester.path / "m", num_layers=2)
    monkeypatch.setenv("TOKENWISE_CACHE_DIR", str(pytester.path / "uc"))
    xy = pytester.path / "uc" / "xy"
    xy.mkdir(parents=True)
    bystander = xy / "m-0123456789ab-0123456789ab.safetensors"  # another dir's model named m
    bystander.write_text("not ours")
    (xy / (bystander.name + ".json")).write_text(json.dumps({"model_dir": "/elsewhere/m", "model_fingerprint": "0" * 64}))
    args = ["--model-dir", "m", *XY_SMALL, "--ranks", "8", "--qspecs", "nvfp4@16", "-k", "layer0-self_attn-q_proj"]

    def caches():
        return sorted(p for p in xy.glob("*.safetensors") if p != bystander)

    pytester.runpytest(*args, "--update-baselines").assert_outcomes(passed=1)
    (first,) = caches()
    fingerprint = ModelDir(model).fingerprint
    assert first.name.startswith(f"m-{fingerprint[:12]}-") and first.suffix == ".safetensors"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)

    pytester.runpytest(*args).assert_outcomes(passed=1)  # reused, not captured again
    assert caches() == [first]
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp
    old_copy = shutil.copy(first, pytester.path / "old.safetensors")

    make_demo_model("qwen3", model, num_layers=2, seed=1, overwrite=True)  # the model changes
    result = pytester.runpytest(*args, "--update-baselines")
    result.assert_outcomes(passed=1)
    (second,) = caches()
    assert second.name.startswith(f"m-{ModelDir(model).fingerprint[:12]}-") and second != first
    assert not first.exists() and bystander.read_text() == "not ours"

    # a cache of the old model, given explicitly, is refused
    result = pytester.runpytest(*args, "--xy-path", str(old_copy))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (error,) = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert error.startswith(f"ERROR: tokenwise: --xy-path {old_copy} was captured from a different model than")


def test_smooth_alpha_adds_smoothed_cases(pytester, demo):
    """--smooth-alpha A|search smooths --model-dir on the session's cache and gates it too."""
    model, cache = demo.model, demo.cache
    for alpha in ("0.5", "search"):
        result = pytester.runpytest(f"--model-dir={model}", f"--xy-path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
                                    f"--smooth-alpha={alpha}", "-k", "layer0- and q_proj", "--update-baselines",
                                    f"--tokenwise-cache-dir={pytester.path / 'tc'}", "-p", "no:randomly")
        result.assert_outcomes(passed=2)  # plain + smoothed layer0 q_proj
        result.stdout.fnmatch_lines(["*layer0-self_attn-q_proj-rank8-nvfp4-blk16-smooth*"])
    smoothed = sorted(p.name for p in (pytester.path / "tc" / "smoothed").iterdir() if p.is_dir())
    assert len(smoothed) == 2 and all("-smooth-" in name for name in smoothed)
    meta = json.loads((pytester.path / "tc" / "smoothed" / smoothed[1] / "tokenwise_smooth.json").read_text())
    assert meta["alpha"] == "search" and meta["alphas"]
    result = pytester.runpytest(f"--model-dir={model}", f"--xy-path={cache}", "--smooth-alpha=1.5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--smooth-alpha 1.5 must lie in*"])


# ---------------------------------------------------------------- header and HTML report


def test_header_names_model_cache_thresholds_baselines_grid_device(pytester, harness, demo):
    fingerprint = ModelDir(demo.model).fingerprint
    result = harness("--co")
    header = [line for line in result.outlines if line.startswith("tokenwise: ")]
    assert header == [
        f"tokenwise: model {demo.model} (fingerprint {fingerprint[:12]})",
        f"tokenwise: cache {demo.cache} (64 tokens, 14 projections)",
        "tokenwise: thresholds none (built-in defaults; --thresholds=FILE or thresholds.yaml at the rootdir)",
        f"tokenwise: baselines baselines/{demo.model_id}/",
        "tokenwise: grid 2 configs (ranks 8,16 x nvfp4@16, combined); device cpu",
    ]
    pytester.makefile(".yaml", thresholds="defaults: {nmse: 0.5}\n")
    result = harness("--co", "--baselines-dir=b2", grid=["--ranks", "8", "--qspecs", "nvfp4@16"])
    assert f"tokenwise: thresholds {pytester.path / 'thresholds.yaml'}" in result.outlines
    assert f"tokenwise: baselines b2/{demo.model_id}/" in result.outlines
    assert "tokenwise: grid 1 config (ranks 8 x nvfp4@16, combined); device cpu" in result.outlines


def test_tokenwise_html_matches_the_json_report(pytester, harness):
    from tests.test_html import Page
    from tokenwise_harness.report.html import NOT_GATED

    harness("--update-baselines").assert_outcomes(passed=28)
    layer0 = harness.baselines / "layer0.json"
    doc = read_layer(layer0)
    regressed = "layer0-self_attn-q_proj-rank8-nvfp4-blk16"
    doc["cases"][regressed]["nmse"] = 1e-4
    write_layer(layer0, doc)
    result = harness("--tokenwise-report=out/r.json", "--tokenwise-html=out/r.html")
    result.assert_outcomes(passed=27, failed=1)
    assert f"html report: {pytester.path / 'out' / 'r.html'}" in result.outlines
    rep = report.load_report(pytester.path / "out" / "r.json")
    page = Page((pytester.path / "out" / "r.html").read_text(encoding="utf-8"))
    assert set(page.rows) == set(rep["cases"]) == case_ids()
    for cid, entry in rep["cases"].items():
        assert page.column(cid, "verdict")[1] == entry["verdict"] != NOT_GATED
        assert float(page.column(cid, "nmse")[0]) == rep_nmse(rep, cid)
        assert float(page.column(cid, "nmse_baseline")[0]) == entry["baseline"]["nmse"]
    assert [cid for cid, cls in page.row_classes.items() if cls == "failed"] == [regressed]
    assert "worse" in page.column(regressed, "change")[2]
    assert len(page.images) == 1 and page.external == []
