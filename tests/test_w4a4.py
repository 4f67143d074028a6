"""W4A4: activations quantized on the residual branch only, SVDQuant's inference path.

Reference (float64, built from independent pieces):
    Y~ = X̂·(L1 L2)ᵀ + Q_a(X̂)·Q_w(R)ᵀ + b,    X̂ = X / s when smoothed.
"""

import pytest
import torch

from tests.helpers import run_cli
from tests.oracles import fake_quantize_ref, truncated_svd64
from tokenwise_harness import engine as evaluate
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.grid import SvdqConfig, build_grid, parse_qspecs
from tokenwise_harness.run import EvalSpec, run_eval

QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def setup(demo_model_dirs, tmp_path_factory):
    model_dir = demo_model_dirs["qwen2"]  # biases on q/k/v
    cache = save_xy(model_dir, tmp_path_factory.mktemp("w4a4"), "c", cn=3, eu=3, length=32, save_dtype="fp32",
                    **QUIET)
    return model_dir, cache


def reference_nmse(x, y, w, b, rank, fmt, blk, afmt, ablk, quantize_branch_input=False):
    """Float64 from independent pieces: torch.linalg.svd for the branch, the numpy/ml_dtypes
    format oracle (tests/oracles.py) for Q_w and Q_a."""
    branch = truncated_svd64(w, rank) if rank else torch.zeros_like(w, dtype=torch.float64)
    residual_q = torch.from_numpy(fake_quantize_ref(w.double() - branch, fmt, blk))
    x_q = torch.from_numpy(fake_quantize_ref(x, afmt, ablk))
    branch_in = x_q if quantize_branch_input else x.double()
    y_tilde = branch_in @ branch.T + x_q @ residual_q.T + (0 if b is None else b.double())
    err = (y_tilde - y.double()).numpy()
    return float((err ** 2).sum() / (y.double().numpy() ** 2).sum())


def test_keys_and_grid_modes():
    w, a = parse_qspecs("nvfp4@16"), parse_qspecs("nvfp4@16,int4@64")
    combined = [c.key for c in build_grid([8], w, "combined", a)]
    assert combined == ["rank=8;fmt=nvfp4;blk=16;afmt=nvfp4;ablk=16", "rank=8;fmt=nvfp4;blk=16;afmt=int4;ablk=64"]
    full = [c.key for c in build_grid([8], w, "full", a)]
    assert "rank=0;fmt=none;blk=none;afmt=int4;ablk=64" in full  # activation-only row
    assert "rank=8;fmt=none;blk=none" in full  # rank-only keeps its weight-only key
    assert [c.key for c in build_grid([8], w, "combined")] == ["rank=8;fmt=nvfp4;blk=16"]


@pytest.mark.parametrize("act", ["int4@64", "nvfp4@16", "mxfp4@32"])
def test_w4a4_matches_float64_reference_and_branch_sees_unquantized_x(setup, act):
    model_dir, cache_path = setup
    cache, mdir = XYCache(cache_path), ModelDir(model_dir)
    afmt, ablk = act.split("@")
    cfg = SvdqConfig(8, "nvfp4", 16, afmt, int(ablk))
    # one chunk holds every token, so nvfp4's per-chunk tensor scale is the reference's
    results = evaluate.evaluate_grid(cache, evaluate.CheckpointWeights(mdir, False), [cfg], 1 << 20, "cpu",
                                     progress=False)
    for target in cache.targets:
        e = cache.entry(target)
        x, y = cache.rows(e.x_key, 0, cache.n_tokens), cache.rows(e.y_key, 0, cache.n_tokens)
        w, b = mdir.read(target.path + ".weight").float(), mdir.read(target.path + ".bias")
        got = results[(target.layer, target.block, target.proj)][cfg.key]["nmse"]
        right = reference_nmse(x, y, w, b, 8, "nvfp4", 16, afmt, int(ablk))
        wrong = reference_nmse(x, y, w, b, 8, "nvfp4", 16, afmt, int(ablk), quantize_branch_input=True)
        assert got == pytest.approx(right, rel=1e-4), target.path
        assert abs(got - wrong) > 1e-3 * right, target.path  # would fail if the branch saw Q_a(X)


def test_activation_only_row_and_weight_only_unchanged(setup):
    model_dir, cache_path = setup
    kw = dict(model_dir=str(model_dir), xy_path=str(cache_path), grid_mode="full")
    plain = run_eval(EvalSpec.from_text("8", "nvfp4@16", **kw), **QUIET)
    w4a4 = run_eval(EvalSpec.from_text("8", "nvfp4@16", act_qspecs=parse_qspecs("int4@64"), **kw), **QUIET)
    q_plain = plain["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"]
    q = w4a4["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"]
    assert set(q_plain) == {"rank=8;fmt=nvfp4;blk=16", "rank=0;fmt=nvfp4;blk=16", "rank=8;fmt=none;blk=none"}
    assert q["rank=8;fmt=none;blk=none"] == q_plain["rank=8;fmt=none;blk=none"]
    act_only = q["rank=0;fmt=none;blk=none;afmt=int4;ablk=64"]["nmse"]
    assert 0 < act_only < q["rank=0;fmt=nvfp4;blk=16;afmt=int4;ablk=64"]["nmse"]  # fewer error sources
    assert w4a4["meta"]["act_qspecs"] == [["int4", "64"]]


def test_smoothing_lowers_w4a4_error_on_outlier_channels(demo_model_dir, tmp_path):
    from tokenwise_harness.calib.smooth import smooth
    from tokenwise_harness.demo.models import planted_outliers

    cache = save_xy(demo_model_dir, tmp_path, "c", cn=3, eu=3, length=32, save_dtype="fp32", **QUIET)
    smoothed = smooth(demo_model_dir, cache, tmp_path / "sm", alpha=0.5, log=lambda m: None)
    act = parse_qspecs("nvfp4@16")
    plain = run_eval(EvalSpec.from_text("16", "nvfp4@16", model_dir=str(demo_model_dir), xy_path=str(cache),
                                        act_qspecs=act), **QUIET)
    sm = run_eval(EvalSpec.from_text("16", "nvfp4@16", model_dir=str(smoothed), xy_path=str(cache), smooth=True,
                                     act_qspecs=act), **QUIET)
    key = "rank=16;fmt=nvfp4;blk=16;afmt=nvfp4;ablk=16"
    for path in planted_outliers(demo_model_dir):
        _, _, layer, block, proj = path.split(".")
        a = plain["by_layer"][layer][block]["by_proj"][proj][key]["nmse"]
        b = sm["by_layer"][layer][block]["by_proj"][proj][key]["nmse"]
        assert b < a, (path, a, b)


def test_memory_per_chunk_is_bounded(setup, monkeypatch):
    """Every host buffer and device tensor the engine streams is [chunk, dim], whatever N is."""
    from tokenwise_harness import cache as cache_mod

    model_dir, cache_path = setup
    rows, yielded = [], []
    real_iter = cache_mod._ChunkStream.__iter__

    def spy_iter(self):
        for start, end, tensors in real_iter(self):
            if start == 0:  # the host buffers, made when the stream starts
                rows.extend(b.shape[0] for slot in self.buffers for b in slot.values())
            yielded.extend(t.shape[0] for t in tensors if t is not None)
            yield start, end, tensors

    monkeypatch.setattr(cache_mod._ChunkStream, "__iter__", spy_iter)
    run_eval(EvalSpec.from_text("8", "nvfp4@16", model_dir=str(model_dir), xy_path=str(cache_path), chunk_tokens=40,
                                act_qspecs=parse_qspecs("nvfp4@16")), **QUIET)
    assert set(rows) == {40} and max(yielded) == 40 and len(yielded) > 100
    assert XYCache(cache_path).n_tokens == 192  # so 40 is a real bound, with a ragged last chunk


def test_cli_w4a4_and_quantizer_conflict(setup, tmp_path):
    model_dir, cache_path = setup
    out = tmp_path / "r.json"
    proc = run_cli("eval_fake", "--model_dir", model_dir, "--xy_path", cache_path, "--out_json", out,
                   "--ranks", "16", "--qspecs", "nvfp4@16", "--act_qspecs", "nvfp4@16,int4@64")
    assert proc.returncode == 0, proc.stderr
    assert "afmt=int4;ablk=64" in out.read_text()
    proc = run_cli("eval_fake", "--model_dir", model_dir, "--xy_path", cache_path, "--out_json", tmp_path / "x.json",
                   "--ranks", "16", "--qspecs", "nvfp4@16", "--act_qspecs", "nvfp4@16",
                   "--quantizer", "tests.quantizers:correct_fake_op")
    assert proc.returncode == 2 and "--act_qspecs" in proc.stderr
