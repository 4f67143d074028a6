"""One scoring flow (issue 15, item 1): the CLI and the pytest plugin score through run.py.

Parity: for the same model, cache and grid, `eval_fake`/`eval_smooth --out_json` and
`pytest --tokenwise-report=` give identical numbers for every (layer, projection, config)
and the same meta (the plugin scores one weight at a time, the CLI all at once). Pytest runs
in-process (pytester); see tests/test_plugin.py's docstring for the pre-imports.
"""

import gc
import json
import shutil

import pytest

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

import tokenwise_harness.calib.smooth  # noqa: F401
import tokenwise_harness.engine  # noqa: F401
import tokenwise_harness.numerics.metrics  # noqa: F401
import tokenwise_harness.numerics.svdq  # noqa: F401
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tests.helpers import run_cli
from tokenwise_harness import checkpoint, engine
from tokenwise_harness.allowlist import Target
from tokenwise_harness.calib.smooth import smooth
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.grid import parse_qspecs
from tokenwise_harness.report import document as report
from tokenwise_harness.run import ENGINE_LOADED, ENGINE_SHARDS, EvalSpec, Evaluation

pytest_plugins = ["pytester"]

# mode -> (CLI grid flags, the same grid in pytest's spelling, smoothed?)
MODES = {
    "weights-full": (["--ranks", "0,8", "--qspecs", "nvfp4@16,int4@32", "--grid_mode", "full"],
                     ["--ranks=0,8", "--qspecs=nvfp4@16,int4@32", "--grid-mode=full"], False),
    "w4a4": (["--ranks", "8", "--qspecs", "nvfp4@16", "--act_qspecs", "nvfp4@16,int4@64"],
             ["--ranks=8", "--qspecs=nvfp4@16", "--act-qspecs=nvfp4@16,int4@64"], False),
    "smooth-w4a4": (["--ranks", "8", "--qspecs", "nvfp4@16", "--act_qspecs", "int4@64,mxfp4@32"],
                    ["--ranks=8", "--qspecs=nvfp4@16", "--act-qspecs=int4@64,mxfp4@32"], True),
}


@pytest.fixture(scope="module")
def models(demo_model_dirs, tmp_path_factory):
    """{family: (model dir, smoothed dir, cache)} for qwen3 and llama."""
    out = {}
    for family in ("qwen3", "llama"):
        root = tmp_path_factory.mktemp(f"run_{family}")
        model = demo_model_dirs[family]
        cache = save_xy(model, root, "c", cn=2, eu=2, length=16, progress=False, log=lambda m: None)
        smoothed = smooth(model, cache, root / "smoothed", alpha=0.5, log=lambda m: None)
        out[family] = (model, smoothed, cache)
    gc.collect()
    gc.freeze()  # see tests/test_plugin.py: keeps pytester's per-run gc passes short
    yield out
    gc.unfreeze()


def _cli_report(tmp_path, model, cache, grid, smoothed) -> dict:
    out = tmp_path / "cli.json"
    cmd, flag = ("eval_smooth", "--smooth_model_dir") if smoothed else ("eval_fake", "--model_dir")
    proc = run_cli(cmd, flag, model, "--xy_path", cache, "--out_json", out, *grid, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def _pytest_report(pytester, tmp_path, model, cache, grid, smoothed) -> dict:
    out = tmp_path / "pt.json"
    flag = "--smooth-model-dir" if smoothed else "--model-dir"
    result = pytester.runpytest(f"{flag}={model}", f"--xy-path={cache}", *grid, "--device=cpu",
                                f"--baselines-dir={tmp_path / 'bl'}", f"--tokenwise-report={out}")
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), "\n".join(result.outlines)
    return json.loads(out.read_text())


def _numbers(rep: dict) -> dict:
    """(layer, projection, config) -> metrics."""
    return {(layer, proj, cfg): metrics
            for layer, blocks in rep["by_layer"].items() for block in blocks.values()
            for proj, cfgs in block["by_proj"].items() for cfg, metrics in cfgs.items()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_cli_and_pytest_reports_agree(pytester, tmp_path, models, family, mode):
    cli_grid, pt_grid, smoothed = MODES[mode]
    model, smoothed_dir, cache = models[family]
    model = smoothed_dir if smoothed else model
    cli = _cli_report(tmp_path, model, cache, cli_grid, smoothed)
    pt = _pytest_report(pytester, tmp_path, model, cache, pt_grid, smoothed)

    cli_numbers, pt_numbers = _numbers(cli), _numbers(pt)
    assert len(cli_numbers) == 14 * len(cli["meta"]["configs"]) > 14
    assert pt_numbers == cli_numbers  # identical floats, every (layer, projection, config)
    assert pt["by_layer"] == cli["by_layer"]  # aggregates too
    cli_meta, pt_meta = (report.comparable(r)["meta"] for r in (cli, pt))
    assert set(pt_meta) == set(cli_meta)
    assert pt_meta == cli_meta
    assert {"model_fingerprint", "engine", "xy_meta", "configs"} <= set(pt_meta)
    assert ("act_qspecs" in pt_meta) == ("w4a4" in mode) and ("smooth_meta" in pt_meta) == smoothed
    assert pt_meta["engine"] == ENGINE_SHARDS and pt_meta["smooth"] is smoothed


def test_pytest_refuses_w4a4_with_a_model_level_quantizer(pytester, models):
    model, _, cache = models["qwen3"]
    result = pytester.runpytest(f"--model-dir={model}", f"--xy-path={cache}", "--ranks=8", "--qspecs=nvfp4@16",
                                "--act-qspecs=int4@64", "--quantizer=tests.quantizers:correct_fake_op")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "--act-qspecs cannot be combined with --quantizer" in errors[0], result.errlines


def _bin_copy(model, dest):
    """The model re-saved as a pytorch_model.bin checkpoint (no safetensors shards)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model, dest)
    state = {}
    for shard in sorted(dest.glob("*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    for index in dest.glob("*.safetensors.index.json"):
        index.unlink()
    torch.save(state, dest / "pytorch_model.bin")
    return dest


def test_bin_checkpoint_loads_the_model_once_and_scores_as_the_shards(models, tmp_path, monkeypatch):
    model = models["llama"][0]
    binary = _bin_copy(model, tmp_path / "bin")
    cache = save_xy(binary, tmp_path, "c", cn=2, eu=2, length=16, progress=False, log=lambda m: None)
    loads = []
    real_load = checkpoint.load_model

    def counting_load(*args, **kw):
        loads.append(args[0].path)
        return real_load(*args, **kw)

    monkeypatch.setattr("tokenwise_harness.run.load_model", counting_load)
    kw = dict(xy_path=str(cache), device="cpu", act_qspecs=parse_qspecs("int4@64"))
    ev = Evaluation(EvalSpec.from_text("8", "nvfp4@16", model_dir=str(binary), **kw))
    assert ev.engine == ENGINE_LOADED
    expected = engine.evaluate_grid(ev.cache, engine.CheckpointWeights(ModelDir(model), False), ev.grid, 4096,
                                    "cpu", progress=False)
    got = {}
    for target in ev.cache.targets:  # one weight at a time, as the pytest plugin asks
        got.update(ev.score(ev.grid, [target]))
    assert loads == [binary]  # save_xy loads through its own call; the Evaluation loads once
    assert got.keys() == expected.keys() and len(got) == 14
    for key, cfgs in expected.items():
        for cfg, metrics in cfgs.items():
            assert got[key][cfg]["nmse"] == pytest.approx(metrics["nmse"], rel=1e-5), (key, cfg)
    assert ev.score(ev.grid, [Target(0, "mlp", "down_proj")]).keys() == {(0, "mlp", "down_proj")}
