"""The kernel gate (issue 16): user kernels at weight level, the torchao adapter, the checks.

Kernels live in tests/weight_kernels.py: `svdq` is an independent implementation (float64 SVD, its
own casts, reciprocal scaling: not the engine's code); the others are broken on purpose.
One 2-layer demo model (14 projections) and one small cache per module.
"""

from __future__ import annotations

import collections
import gc
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

try:  # hypothesis's pytest plugin imports it at every run's summary: keep it loaded
    import hypothesis  # noqa: F401
except ImportError:
    pass

import tokenwise_harness.engine  # noqa: F401  (keep loaded across in-process pytester runs)
import tokenwise_harness.pytest_plugin.session  # noqa: F401
import tokenwise_harness.run  # noqa: F401
import tokenwise_harness.verdict.baselines  # noqa: F401
import tokenwise_harness.verdict.thresholds  # noqa: F401
from tests import weight_kernels  # noqa: F401  (kept loaded across in-process pytester runs)
from tests.helpers import files_under, one_line_error, run_cli
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.demo.models import make_demo_model

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
GRID = ["--ranks", "0,8", "--qspecs", "nvfp4@16,mxfp4@32,int4@64"]
N_WEIGHTS, N_CFGS = 14, 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels_demo")
    model = make_demo_model("qwen3", root / "qwen3", num_layers=2)
    cache = save_xy(model, root / "cache", "c", cn=2, eu=2, length=16, progress=False, log=lambda m: None)
    gc.collect()
    gc.freeze()
    yield SimpleNamespace(model=model, cache=Path(cache))
    gc.unfreeze()


def eval_fake(demo, out: Path, *args, grid=GRID):
    return run_cli("eval_fake", "--model_dir", demo.model, "--xy_path", demo.cache, "--out_json", out, *grid, *args)


def metrics_of(report: dict) -> dict:
    return {(layer, p, key): m for layer, blocks in report["by_layer"].items() for b in blocks.values()
            for p, cfgs in b["by_proj"].items() for key, m in cfgs.items()}


@pytest.fixture(scope="module")
def builtin(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "r.json"
    proc = eval_fake(demo, out)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("kernel", ["tests.weight_kernels:svdq", "tests.weight_kernels:svdq_parts"])
def test_independent_kernel_reproduces_builtin_numbers(demo, builtin, tmp_path, kernel):
    out = tmp_path / "r.json"
    proc = eval_fake(demo, out, "--weight_quantizer", kernel)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["quantizer"] == kernel
    assert "weight-level kernel" in report["meta"]["engine"]
    mine, ref = metrics_of(report), metrics_of(builtin)
    assert mine.keys() == ref.keys() and len(ref) == N_WEIGHTS * N_CFGS
    for k, m in ref.items():  # same recipe, other code and rounding order: equal to float32 noise
        for name in ("nmse", "token_rel_l2_max", "token_l2_mean"):
            assert mine[k][name] == pytest.approx(m[name], rel=1e-4, abs=1e-12), (k, name)


def test_scale_bug_moves_every_quantized_number(demo, builtin, tmp_path):
    out = tmp_path / "r.json"
    assert eval_fake(demo, out, "--weight_quantizer", "tests.weight_kernels:scale_bug").returncode == 0
    mine, ref = metrics_of(json.loads(out.read_text())), metrics_of(builtin)
    assert all(mine[k]["nmse"] > 1.05 * ref[k]["nmse"] for k in ref)


def test_torchao_adapter_agrees_with_builtin_engine(demo, builtin, tmp_path):
    torchao = pytest.importorskip("torchao")
    from tokenwise_harness.kernels.torchao_adapter import TORCHAO_RTOL

    out = tmp_path / "r.json"
    grid = ["--ranks", "0,8", "--qspecs", "nvfp4@16,mxfp4@32"]
    proc = eval_fake(demo, out, "--weight_quantizer", "torchao", grid=grid)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["quantizer"] == f"torchao adapter (torchao {torchao.__version__})"
    mine, ref = metrics_of(report), metrics_of(builtin)
    assert len(mine) == N_WEIGHTS * 4
    for k, m in mine.items():
        for name in ("nmse", "token_rel_l2_max", "token_l2_mean"):
            assert m[name] == pytest.approx(ref[k][name], rel=TORCHAO_RTOL), (k, name)


def test_torchao_adapter_refuses_other_formats(demo, tmp_path):
    pytest.importorskip("torchao")
    for qspec, needle in (("int4@64", "the torchao adapter casts nvfp4 and mxfp4 only (got int4)"),
                          ("nvfp4@32", "torchao's NVFP4 has 16-element blocks only (got blk 32)")):
        line = one_line_error(eval_fake(demo, tmp_path / "r.json", "--weight_quantizer", "torchao",
                                        grid=["--ranks", "8", "--qspecs", qspec]))
        assert needle in line and "weight quantizer torchao adapter" in line
    assert files_under(tmp_path) == []


def test_torchao_parts_give_exact_branch():
    """The adapter's low-rank branch is the engine's exact top-r one; its residual torchao's cast."""
    pytest.importorskip("torchao")
    import torch

    from tokenwise_harness import QuantConfig
    from tokenwise_harness.kernels import load_weight_quantizer
    from tokenwise_harness.numerics import formats
    from tokenwise_harness.numerics.lowrank import LowRank

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    kernel = load_weight_quantizer("torchao")
    parts = kernel(w, QuantConfig(8, "nvfp4", 16), name="x")
    branch = LowRank(w.float(), 8).product(8)
    assert torch.allclose(parts.lora_up @ parts.lora_down, branch, atol=1e-6)
    assert torch.equal(parts.residual, formats.fake_quantize(w.float() - parts.lora_up @ parts.lora_down, "nvfp4", 16))


# ---------------------------------------------------------------- W4A4


def test_w4a4_needs_parts_same_error_in_both_front_ends(demo, pytester, tmp_path):
    act = ["--ranks", "8", "--qspecs", "nvfp4@16"]
    out = tmp_path / "r.json"
    line = one_line_error(eval_fake(demo, out, "--act_qspecs", "int4@64", "--weight_quantizer", "tests.weight_kernels:svdq",
                                    grid=act))
    needle = "returned a plain tensor, but a W4A4 config (--act_qspecs) needs SvdqParts(lora_down, lora_up, residual)"
    assert needle in line and "tests.weight_kernels:svdq" in line and "rank=8;fmt=nvfp4;blk=16;afmt=int4;ablk=64" in line
    result = pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *act, "--act-qspecs",
                                "int4@64", "--weight-quantizer", "tests.weight_kernels:svdq", "-k", "layer0-self_attn-q_proj",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert needle in "\n".join(result.outlines)
    # The parts are what the engine needs: the W4A4 numbers equal the built-in engine's.
    ref, mine = tmp_path / "ref.json", tmp_path / "mine.json"
    assert eval_fake(demo, ref, "--act_qspecs", "int4@64", grid=act).returncode == 0
    assert eval_fake(demo, mine, "--act_qspecs", "int4@64", "--weight_quantizer", "tests.weight_kernels:svdq_parts",
                     grid=act).returncode == 0
    a, b = metrics_of(json.loads(ref.read_text())), metrics_of(json.loads(mine.read_text()))
    assert a.keys() == b.keys() and all(b[k]["nmse"] == pytest.approx(a[k]["nmse"], rel=1e-4) for k in a)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name, needle", [
    ("wrong_shape", "returned shape [64, 63]; it must return W~ of the weight's shape [64, 64]"),
    ("nan_out", "the result holds 1 NaN/Inf values"),
    ("int_out", "the result has dtype torch.int32; it must be a float tensor"),
    ("not_a_tensor", "the result is a list, not a torch.Tensor"),
    ("raising", "raised RuntimeError on model.layers.0.self_attn.q_proj.weight [64, 64] under "
                "rank=0;fmt=nvfp4;blk=16: CUDA error: an illegal memory access was encountered"),
    ("in_place", "modified its input model.layers.0.self_attn.q_proj.weight in place"),
])
def test_bad_kernel_is_one_line_error(demo, pytester, tmp_path, name, needle):
    spec = f"tests.weight_kernels:{name}"
    line = one_line_error(eval_fake(demo, tmp_path / "r.json", "--weight_quantizer", spec))
    assert f"weight quantizer {spec}" in line and needle in line, line
    assert "model.layers.0.self_attn.q_proj.weight" in line and "rank=" in line
    assert files_under(tmp_path) == []  # nothing written
    # pytest: the case fails with the same line, the session goes on (no traceback, no INTERNALERROR)
    result = pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID,
                                "--weight-quantizer", spec, "-k", "layer0-self_attn-q_proj-rank0-nvfp4",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = "\n".join(result.outlines)
    assert needle in text and "Traceback" not in text and "INTERNALERROR" not in text


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module:fn", "--weight-quantizer 'no_such_module:fn': cannot import no_such_module"),
    ("tests.weight_kernels:nope", "--weight-quantizer 'tests.weight_kernels:nope': tests.weight_kernels has no function nope"),
    ("svdq", "--weight-quantizer 'svdq' must look like package.module:function, or name a built-in adapter: torchao"),
])
def test_unloadable_kernel_is_usage_error(demo, pytester, spec, needle):
    result = pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID,
                                "--weight-quantizer", spec, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and needle in errors[0], result.errlines


def test_both_protocols_at_once_is_refused(demo, tmp_path):
    line = one_line_error(eval_fake(demo, tmp_path / "r.json", "--weight_quantizer", "tests.weight_kernels:svdq",
                                    "--quantizer", "tests.quantizers:correct_fake_op"))
    assert "give one of them" in line


def test_iterated_branch_is_refused_up_front(demo, tmp_path):
    line = one_line_error(eval_fake(demo, tmp_path / "r.json", "--weight_quantizer", "tests.weight_kernels:svdq",
                                    "--lowrank_iters", "3"))
    assert "--lowrank_iters > 1" in line


# ---------------------------------------------------------------- once per selected case


def _calls(path: Path) -> collections.Counter:
    return collections.Counter(line.split(" ", 2)[2] for line in path.read_text().splitlines())


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_kernel_called_once_per_selected_case(demo, pytester, monkeypatch, workers):
    calls = pytester.path / "calls.txt"
    calls.write_text("")
    monkeypatch.setenv("TOKENWISE_KERNEL_CALLS", str(calls))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    selection = "layer1 and (q_proj or down_proj) and not int4"
    args = [f"--model-dir={demo.model}", f"--xy-path={demo.cache}", *GRID, "--weight-quantizer",
            "tests.weight_kernels:counting", "-k", selection, "--update-baselines", "-p", "no:cacheprovider", *workers]
    if workers:
        result = pytester.runpytest_subprocess(*args, timeout=240)
    else:
        result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2 * 4)  # 2 weights x (2 ranks x 2 formats)
    counted = _calls(calls)
    assert counted == {f"rank={r};fmt={f};blk={b}": 2 for r in (0, 8) for f, b in (("nvfp4", 16), ("mxfp4", 32))}
    from tokenwise_harness.checkpoint import ModelDir

    dtype = str(ModelDir(demo.model).read("model.layers.1.mlp.down_proj.weight").dtype)
    assert {line.split(" ")[1] for line in calls.read_text().splitlines()} == {dtype}  # the checkpoint's dtype


class _ServedBytes:
    """A pytest plugin keeping what the session's cache reader served, per tensor, at session end."""

    served: dict = {}

    def pytest_sessionfinish(self, session):
        from tokenwise_harness.pytest_plugin.hooks import _SESSION

        self.served = dict(session.config.stash[_SESSION].cache.bytes_served)


@pytest.fixture(scope="module")
def compact_cache(demo):
    """A compact cache of the demo model: q/k/v and gate/up read one stored X each."""
    return Path(save_xy(demo.model, demo.cache.parent / "compact", "c", cn=2, eu=2, length=16, compact=True,
                        progress=False, log=lambda m: None))


def test_plugin_scores_an_input_group_in_one_pass_over_x(demo, compact_cache, pytester, monkeypatch):
    """The first case of q_proj scores every selected q/k/v case (each with its own selected
    configs) from one read of their shared X; the kernel runs once per selected case."""
    from tokenwise_harness.cache import XYCache

    calls = pytester.path / "calls.txt"
    calls.write_text("")
    monkeypatch.setenv("TOKENWISE_KERNEL_CALLS", str(calls))
    spy = _ServedBytes()
    selection = "layer1-self_attn-q_proj-rank8 or layer1-self_attn-k_proj-rank0 or layer1-self_attn-v_proj"
    result = pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={compact_cache}", "--ranks", "0,8",
                                "--qspecs", "nvfp4@16,mxfp4@32", "--weight-quantizer", "tests.weight_kernels:counting",
                                "-k", selection, "--update-baselines", "-p", "no:cacheprovider", plugins=[spy])
    result.assert_outcomes(passed=2 + 2 + 4)  # q: rank 8 x 2 formats, k: rank 0 x 2, v: all 4
    keys = [f"rank={r};fmt={f};blk={b}" for r in (0, 8) for f, b in (("nvfp4", 16), ("mxfp4", 32))]
    q, kv = "64x64", "32x64"  # the demo's shapes: q [64, 64], k and v [32, 64]
    assert collections.Counter(" ".join(line.split(" ")[::2]) for line in calls.read_text().splitlines()) == {
        **{f"{q} {key}": 1 for key in keys[2:]}, **{f"{kv} {key}": 1 for key in keys[2:]},
        **{f"{kv} {key}": 2 for key in keys[:2]}}
    cache = XYCache(compact_cache)
    x_key = cache.entry(cache.targets[7]).x_key  # layer 1's q/k/v input
    assert spy.served == {x_key: cache.n_tokens * 64 * 2}  # fp16, read once for the three weights


SERVED_PER_WORKER = """
import json

def pytest_sessionfinish(session):
    from tokenwise_harness.pytest_plugin.hooks import _SESSION

    worker = getattr(session.config, "workerinput", {}).get("workerid")
    harness = session.config.stash.get(_SESSION, None)
    if worker and harness is not None and harness.cache is not None:
        with open(OUT + f"/served-{worker}.json", "w") as fh:
            json.dump(dict(harness.cache.bytes_served), fh)
"""


def test_xdist_reads_each_input_group_once_on_one_worker(demo, compact_cache, pytester, monkeypatch):
    """-n 2 on a compact cache: every case of the weights sharing one X (q/k/v, gate/up) runs on
    one worker, which reads that X once; so each X is read once in all, as in a serial run. The
    kernel runs once per selected case across workers; the deselected o_proj is never scored."""
    from tokenwise_harness.cache import XYCache

    calls = pytester.path / "calls.txt"
    calls.write_text("")
    monkeypatch.setenv("TOKENWISE_KERNEL_CALLS", str(calls))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest(f"OUT = {str(pytester.path)!r}\n" + SERVED_PER_WORKER)
    result = pytester.runpytest_subprocess(
        f"--model-dir={demo.model}", f"--xy-path={compact_cache}", "--ranks", "8", "--qspecs", "nvfp4@16,mxfp4@32",
        "--weight-quantizer", "tests.weight_kernels:counting", "-k", "not o_proj", "--update-baselines",
        "-p", "no:cacheprovider", "-n", "2", timeout=240)
    result.assert_outcomes(passed=2 * 6 * 2)  # 2 layers x 6 weights x 2 configs
    assert sorted(_calls(calls).values()) == [12, 12]  # each config once per weight: 12 weights
    cache = XYCache(compact_cache)
    served = {p.stem: json.loads(p.read_text()) for p in pytester.path.glob("served-gw*.json")}
    assert sorted(served) == ["served-gw0", "served-gw1"] and all(served.values()), served
    groups = {cache.entry(t).x_key: cache.entry(t).in_dim for t in cache.targets if t.proj != "o_proj"}
    assert len(groups) == 2 * 3  # per layer: q/k/v, gate/up, down
    readers = collections.Counter(key for worker in served.values() for key in worker)
    assert readers == {key: 1 for key in groups}, served  # each X on one worker, o_proj's never read
    read = {key: n for worker in served.values() for key, n in worker.items()}
    assert read == {key: cache.n_tokens * dim * 2 for key, dim in groups.items()}  # fp16, read once


def test_plugin_fails_only_the_weight_of_a_group_whose_rank_is_too_large(demo, compact_cache, pytester):
    """Rank 48 fits q_proj [64, 64] but not k/v [32, 64]: scored in one pass, q's cases still pass."""
    result = pytester.runpytest(f"--model-dir={demo.model}", f"--xy-path={compact_cache}", "--ranks", "48",
                                "--qspecs", "nvfp4@16", "-k", "layer0 and self_attn and not o_proj",
                                "--update-baselines", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    out = "\n".join(result.outlines)
    assert "rank 48 exceeds min(out, in) = 32 of model.layers.0.self_attn.k_proj" in out
    assert "rank 48 exceeds min(out, in) = 32 of model.layers.0.self_attn.v_proj" in out


def test_model_level_quantizer_scores_only_selected_targets(demo):
    import torch

    from tokenwise_harness.allowlist import Target
    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import ModelDir, load_model
    from tokenwise_harness.engine import evaluate_grid, evaluate_with_model_op
    from tokenwise_harness.grid import SvdqConfig
    from tokenwise_harness.numerics.svdq import fake_op

    mdir = ModelDir(demo.model)
    target = Target(1, "mlp", "up_proj")
    cfgs = [SvdqConfig(8, "nvfp4", 16)]
    model = load_model(mdir, "auto")
    got = evaluate_with_model_op(XYCache(demo.cache), model, fake_op, cfgs, 4096, "cpu", False, progress=False,
                                 targets=[target])
    assert list(got) == [(1, "mlp", "up_proj")]
    ref = evaluate_grid(XYCache(demo.cache), tokenwise_harness.engine.CheckpointWeights(mdir, False), cfgs, 4096,
                        "cpu", targets=[target], progress=False)
    assert got[(1, "mlp", "up_proj")][cfgs[0].key]["nmse"] == pytest.approx(
        ref[(1, "mlp", "up_proj")][cfgs[0].key]["nmse"], rel=1e-5)
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    assert torch.equal(before, mdir.read("model.layers.1.mlp.up_proj.weight").to(before.dtype))  # restored


def test_kernel_output_checks_unit():
    import torch

    from tokenwise_harness import QuantConfig, SvdqParts
    from tokenwise_harness.errors import HarnessError
    from tokenwise_harness.kernels import WeightKernel

    w = torch.randn(6, 8)
    cfg = QuantConfig(2, "nvfp4", 16)
    ok = WeightKernel(lambda w, c: SvdqParts(torch.zeros(2, 8), torch.zeros(6, 2), w * 1.0), "k")(w, cfg, name="m")
    assert isinstance(ok, SvdqParts) and ok.residual.dtype == torch.float32
    with pytest.raises(HarnessError, match=r"SvdqParts.lora_up has shape \[6, 3\]; it must be \[6, 2\]"):
        WeightKernel(lambda w, c: SvdqParts(torch.zeros(2, 8), torch.zeros(6, 3), w), "k")(w, cfg, name="m")
    with pytest.raises(HarnessError, match=r"SvdqParts.lora_down has shape \[2, 7\]; it must be \[rank, 8\]"):
        WeightKernel(lambda w, c: SvdqParts(torch.zeros(2, 7), torch.zeros(6, 2), w), "k")(w, cfg, name="m")
    half = WeightKernel(lambda w, c: w.half(), "k")(w, cfg, name="m")
    assert half.dtype == torch.float32 and torch.equal(half, w.half().float())
