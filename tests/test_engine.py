"""The evaluation engine, eval_fake / eval_smooth / smooth from the CLI, and their errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import files_under, one_line_error, run_cli, run_cli_subprocess
from tokenwise_harness import engine as evaluate
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.grid import SvdqConfig, build_grid, parse_qspecs
from tokenwise_harness.numerics.svdq import fake_quantize_weight
from tokenwise_harness.report import document as report
from tokenwise_harness.run import EvalSpec, Evaluation, run_eval

QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def qwen2(demo_model_dirs, tmp_path_factory):
    """The qwen2 demo model (q/k/v biases) and an fp32 cache of it."""
    out = tmp_path_factory.mktemp("engine")
    cache = save_xy(demo_model_dirs["qwen2"], out, "c", cn=3, eu=5, length=25, save_dtype="fp32", **QUIET)
    return demo_model_dirs["qwen2"], cache


@pytest.fixture(scope="module")
def qwen3(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine3")
    cache = save_xy(demo_model_dir, out, "c", cn=4, eu=4, length=32, save_dtype="fp32", **QUIET)
    return demo_model_dir, cache


def reference_metrics(x, y, w_tilde, b):
    """Independent float64 metrics of Y~ = X W~ᵀ + b against Y (numpy)."""
    x, y, w_tilde = (np.asarray(t, dtype=np.float64) for t in (x, y, w_tilde))
    y_tilde = x @ w_tilde.T + (0.0 if b is None else np.asarray(b, dtype=np.float64))
    err = y_tilde - y
    e_l2 = np.sqrt((err ** 2).sum(1))
    y_l2 = np.sqrt((y ** 2).sum(1))
    sse, denom = float((err ** 2).sum()), float((y ** 2).sum())
    return {"nmse": sse / denom, "sse": sse, "denom": denom, "token_l2_mean": e_l2.mean(),
            "token_l2_max": e_l2.max(), "token_rel_l2_mean": (e_l2 / y_l2).mean(),
            "token_rel_l2_max": (e_l2 / y_l2).max(), "n_tokens": x.shape[0],
            "sqnr_db": -10 * np.log10(sse / denom)}


def test_one_shot_configs_of_an_iterated_grid_take_quantization_delta(qwen2, monkeypatch):
    """A grid with iterated configs (--lowrank_iters > 1) gives the engine Gram matrices; its
    one-shot configs must still reach svdq.quantization_delta (the fused ΔW on CUDA), with the
    numbers of a one-shot grid and of the plain torch composition (a user's quantize_fn)."""
    from tokenwise_harness.numerics import svdq

    model_dir, cache_path = qwen2
    cache, source = XYCache(cache_path), evaluate.CheckpointWeights(ModelDir(model_dir), False)
    grid = build_grid([0, 8], parse_qspecs("nvfp4@16"), "full", iters=3) + [SvdqConfig(8, "nvfp4", 16)]
    one_shot = [c for c in grid if c.iters == 1]
    assert {c.key for c in one_shot} == {"rank=0;fmt=nvfp4;blk=16", "rank=8;fmt=nvfp4;blk=16"}

    def composed(w, cfg, lowrank=None, name="weight", gram=None):  # not the built-in: the torch composition
        return fake_quantize_weight(w, cfg, lowrank=lowrank, name=name, gram=gram)

    reference = evaluate.evaluate_grid(cache, source, grid, 37, "cpu", progress=False, quantize_fn=composed)
    alone = evaluate.evaluate_grid(cache, source, one_shot, 37, "cpu", progress=False)
    real, calls = svdq.quantization_delta, []

    def counted(w, cfg, *args, **kw):
        calls.append(cfg)
        return real(w, cfg, *args, **kw)

    monkeypatch.setattr(svdq, "quantization_delta", counted)
    mixed = evaluate.evaluate_grid(cache, source, grid, 37, "cpu", progress=False)
    n = len(cache.targets)
    assert len(mixed) == n
    for cfg in grid:  # every weights-only config of the built-in quantizer, once per weight
        assert calls.count(cfg) == n, cfg.key
    assert mixed == reference
    for key, metrics in alone.items():
        assert {c.key: mixed[key][c.key] for c in one_shot} == metrics, key


@pytest.mark.parametrize("chunk_tokens", [37, 4096])
def test_metrics_match_float64_reference(qwen2, chunk_tokens):
    model_dir, cache_path = qwen2
    cache, mdir = XYCache(cache_path), ModelDir(model_dir)
    grid = build_grid([0, 8], parse_qspecs("nvfp4@16,fp4@in,int4_asym@32"), "full")
    results = evaluate.evaluate_grid(cache, evaluate.CheckpointWeights(mdir, False), grid, chunk_tokens, "cpu",
                                     progress=False)
    assert len(results) == len(cache.targets)
    for target in cache.targets[:7] + cache.targets[-2:]:
        e = cache.entry(target)
        x, y = cache.rows(e.x_key, 0, cache.n_tokens), cache.rows(e.y_key, 0, cache.n_tokens)
        w, b = mdir.read(target.path + ".weight"), mdir.read(target.path + ".bias")
        for cfg in grid:
            ref = reference_metrics(x, y, fake_quantize_weight(w.float(), cfg), b)
            got = results[(target.layer, target.block, target.proj)][cfg.key]
            for name, value in ref.items():
                assert got[name] == pytest.approx(value, rel=2e-5), (target.path, cfg.key, name)


def test_grid_sets_and_report_schema(qwen3, tmp_path):
    model_dir, cache_path = qwen3
    combined = run_eval(EvalSpec.from_text("8,16", "nvfp4@128", model_dir=str(model_dir), xy_path=str(cache_path)),
                        **QUIET)
    full = run_eval(EvalSpec.from_text("8,16", "nvfp4@128", model_dir=str(model_dir), xy_path=str(cache_path),
                                       grid_mode="full"), **QUIET)
    report.validate_report(combined)
    report.validate_report(full)
    keys = lambda r: set(r["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"])  # noqa: E731
    assert keys(combined) == {"rank=8;fmt=nvfp4;blk=128", "rank=16;fmt=nvfp4;blk=128"}
    assert keys(full) == keys(combined) | {"rank=0;fmt=nvfp4;blk=128", "rank=8;fmt=none;blk=none",
                                           "rank=16;fmt=none;blk=none"}
    assert full["meta"]["qspecs"] == [["nvfp4", "128"]] and full["meta"]["grid_mode"] == "full"
    agg = full["by_layer"]["1"]["mlp"]["agg"]["rank=8;fmt=nvfp4;blk=128"]
    nmses = [full["by_layer"]["1"]["mlp"]["by_proj"][p]["rank=8;fmt=nvfp4;blk=128"]["nmse"]
             for p in ("gate_proj", "up_proj", "down_proj")]
    assert agg["n_proj"] == 3 and agg["nmse_max_over_proj"] == max(nmses)
    assert agg["nmse_mean_over_proj"] == pytest.approx(sum(nmses) / 3, rel=1e-12)


def test_error_does_not_grow_with_rank(qwen3):
    model_dir, cache_path = qwen3
    rep = run_eval(EvalSpec.from_text("0,4,8,16,32", "nvfp4@16", model_dir=str(model_dir), xy_path=str(cache_path),
                                      grid_mode="full"), **QUIET)
    for layer in rep["by_layer"].values():
        for block in layer.values():
            for proj, cfgs in block["by_proj"].items():
                rank_only = [cfgs[f"rank={r};fmt=none;blk=none"]["nmse"] for r in (4, 8, 16, 32)]
                assert rank_only == sorted(rank_only, reverse=True), proj


def test_model_level_quantizer_matches_per_weight_engine(qwen3):
    """The seed's flow (whole-model fake_op, restore) and the per-weight engine agree."""
    model_dir, cache_path = qwen3
    kw = dict(model_dir=str(model_dir), xy_path=str(cache_path))
    ours = run_eval(EvalSpec.from_text("8", "nvfp4@16,int8@32", **kw), **QUIET)
    user = run_eval(EvalSpec.from_text("8", "nvfp4@16,int8@32", quantizer="tests.quantizers:correct_fake_op", **kw),
                    **QUIET)
    for (*_, cfg, a), (*_, b) in zip(report.iter_metrics(ours), report.iter_metrics(user)):
        assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-5, abs=1e-12), cfg


def test_restore_semantics_with_a_stateful_quantizer(qwen3):
    model_dir, cache_path = qwen3
    kw = dict(model_dir=str(model_dir), xy_path=str(cache_path), quantizer="tests.quantizers:accumulating_fake_op")
    restored = run_eval(EvalSpec.from_text("4,8,16", "nvfp4@16", **kw), **QUIET)
    kept = run_eval(EvalSpec.from_text("4,8,16", "nvfp4@16", no_restore=True, **kw), **QUIET)
    q = lambda r: [m["nmse"] for m in r["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"].values()]  # noqa: E731
    assert q(restored)[0] == q(restored)[1] == q(restored)[2]  # every config starts from the original
    assert q(kept)[0] == q(restored)[0]
    assert q(kept)[0] < q(kept)[1] < q(kept)[2]  # without restore the perturbation accumulates
    assert q(kept)[2] == pytest.approx(9 * q(kept)[0], rel=0.05)


def test_smoothing_lowers_error_on_planted_outlier_projections(qwen3, tmp_path):
    from tokenwise_harness.calib.smooth import smooth
    from tokenwise_harness.demo.models import planted_outliers

    model_dir, cache_path = qwen3
    smoothed = smooth(model_dir, cache_path, tmp_path / "sm", alpha=0.5, log=lambda m: None)
    kw = dict(xy_path=str(cache_path))
    plain = run_eval(EvalSpec.from_text("8", "nvfp4@16", model_dir=str(model_dir), **kw), **QUIET)
    smooth_rep = run_eval(EvalSpec.from_text("8", "nvfp4@16", model_dir=str(smoothed), smooth=True, **kw), **QUIET)
    assert smooth_rep["meta"]["smooth"] is True and smooth_rep["meta"]["smooth_meta"]["alpha"] == 0.5
    key = "rank=8;fmt=nvfp4;blk=16"
    for path in planted_outliers(model_dir):
        _, _, layer, block, proj = path.split(".")
        a = plain["by_layer"][layer][block]["by_proj"][proj][key]["nmse"]
        b = smooth_rep["by_layer"][layer][block]["by_proj"][proj][key]["nmse"]
        assert b < 0.5 * a, (path, a, b)


def test_smoothed_model_keeps_the_function(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    from tokenwise_harness.calib.smooth import load_smoothed_model, smooth

    model_dir, cache_path = qwen3
    out = smooth(model_dir, cache_path, tmp_path / "sm", alpha=0.5, log=lambda m: None)
    smoothed = load_smoothed_model(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    q = smoothed.model.layers[0].self_attn.q_proj
    assert hasattr(q, "smooth_factor") and q.smooth_factor.shape == (q.in_features,)
    assert torch.equal(q.smooth_factor, smoothed.model.layers[0].self_attn.k_proj.smooth_factor)  # shared input
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        a, b = original(ids).logits, smoothed(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    meta = json.loads((out / "tokenwise_smooth.json").read_text())
    assert meta["alpha"] == 0.5 and "max|X_j|^alpha" in meta["formula"]


def test_seed_example_commands_end_to_end(qwen3, tmp_path):
    """Seed §4.1-4.3 with the paths swapped for a demo model, as a user runs them."""
    model_dir, _ = qwen3
    c = tmp_path / "cache_xy"
    steps = [
        ["save_xy", "--model_dir", model_dir, "--save_path", c, "--label", "qwen3_s0", "--torch_dtype", "bf16",
         "--cn", 4, "--eu", 4, "--length", 32],
        ["eval_fake", "--model_dir", model_dir, "--xy_path", c / "qwen3_s0.safetensors", "--out_json",
         tmp_path / "results/nocalib_tokenwise.json", "--ranks", "8,16,32", "--qspecs", "nvfp4@128",
         "--grid_mode", "combined", "--chunk_tokens", 2048, "--torch_dtype", "bf16"],
        ["eval_fake", "--model_dir", model_dir, "--xy_path", c / "qwen3_s0.safetensors", "--out_json",
         tmp_path / "results/multiq.json", "--ranks", "16,32", "--qspecs", "nvfp4@128,fp4@128,fp4@in"],
        ["eval_fake", "--model_dir", model_dir, "--xy_path", c / "qwen3_s0.safetensors", "--out_json",
         tmp_path / "results/full.json", "--ranks", "16,32", "--qspecs", "nvfp4@128", "--grid_mode", "full"],
        ["smooth", "--model_dir", model_dir, "--xy_path", c / "qwen3_s0.safetensors", "--out_dir", tmp_path / "sm"],
        ["eval_smooth", "--smooth_model_dir", tmp_path / "sm", "--xy_path", c / "qwen3_s0.safetensors",
         "--out_json", tmp_path / "results/smooth.json", "--ranks", "16,32", "--qspecs", "nvfp4@128"],
        ["analyze", "--report", tmp_path / "results/smooth.json", "--out_dir", tmp_path / "analysis"],
    ]
    for step in steps:
        proc = run_cli(*step)
        assert proc.returncode == 0, (step[0], proc.stderr)
    full = json.loads((tmp_path / "results/full.json").read_text())
    assert len(full["meta"]["configs"]) == 5
    multiq = json.loads((tmp_path / "results/multiq.json").read_text())
    assert multiq["meta"]["qspecs"] == [["nvfp4", "128"], ["fp4", "128"], ["fp4", "in"]]
    assert {"ranking1.csv", "ranking2.md", "heatmap.png"} <= set(files_under(tmp_path / "analysis"))
    proc = run_cli_subprocess("eval_fake", "--model_dir", model_dir, "--xy_path", c / "qwen3_s0.safetensors",
                              "--out_json", tmp_path / "sub.json", "--ranks", "8", "--qspecs", "nvfp4@16")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken_caches(qwen3, demo_model_dirs, tmp_path_factory):
    """Caches that must be refused: another model, a missing key, a shape mismatch, NaN."""
    model_dir, cache_path = qwen3
    root = tmp_path_factory.mktemp("broken")
    other = save_xy(demo_model_dirs["llama"], root, "other", cn=2, eu=2, length=8, **QUIET)
    with safe_open(str(cache_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    meta_nofp = {k: v for k, v in meta.items() if k not in ("model_fingerprint", "checksums")}
    missing = dict(tensors)
    del missing["model.layers.1.mlp.down_proj.X"], missing["model.layers.1.mlp.down_proj.Y"]
    save_file(missing, str(root / "missing.safetensors"), metadata=meta_nofp)
    shape = dict(tensors)
    shape["model.layers.0.self_attn.q_proj.X"] = tensors["model.layers.0.self_attn.q_proj.X"][:, :-1].contiguous()
    save_file(shape, str(root / "shape.safetensors"), metadata=meta_nofp)
    nan = dict(tensors)
    nan["model.layers.0.mlp.up_proj.X"] = tensors["model.layers.0.mlp.up_proj.X"].clone()
    nan["model.layers.0.mlp.up_proj.X"][3, 2] = float("nan")
    save_file(nan, str(root / "nan.safetensors"), metadata=meta_nofp)
    return {"other": other, "missing": root / "missing.safetensors", "shape": root / "shape.safetensors",
            "nan": root / "nan.safetensors", "good": cache_path}


@pytest.mark.parametrize("change, expect", [
    ({"--xy_path": "other"}, "different model"),
    ({"--xy_path": "missing"}, "down_proj.X"),
    ({"--xy_path": "shape"}, "do not match"),
    ({"--xy_path": "nan"}, "NaN"),
    ({"--ranks": ""}, "--ranks"),
    ({"--ranks": "8,x"}, "--ranks"),
    ({"--ranks": "100000"}, "exceeds min(out, in)"),
    ({"--qspecs": "nvfp5@16"}, "nvfp5"),
    ({"--qspecs": "nvfp4@0"}, "nvfp4@0"),
    ({"--grid_mode": "partial"}, "--grid_mode"),
    ({"--out_json": "/proc/no/r.json"}, "--out_json"),
    ({"--chunk_tokens": "0"}, "--chunk_tokens"),
    ({"--quantizer": "nosuchpkg.mod:fn"}, "--quantizer"),
    ({"--device": "cuda"}, "--device"),
], ids=["other-model", "missing-key", "shape", "nan", "empty-ranks", "bad-rank", "rank-too-big", "bad-fmt",
        "bad-blk", "grid-mode", "unwritable-out", "chunk", "quantizer", "no-cuda"])
def test_eval_bad_inputs(qwen3, broken_caches, tmp_path, change, expect):
    if change.get("--device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model_dir, _ = qwen3
    args = {"--model_dir": str(model_dir), "--xy_path": str(broken_caches["good"]),
            "--out_json": str(tmp_path / "r.json"), "--ranks": "8", "--qspecs": "nvfp4@16"}
    for k, v in change.items():
        args[k] = str(broken_caches.get(v, v))
    line = one_line_error(run_cli("eval_fake", *[x for kv in args.items() for x in kv]))
    assert expect in line
    assert files_under(tmp_path) == []


def test_eval_smooth_needs_smooth_factor_buffers(qwen3, tmp_path):
    model_dir, cache_path = qwen3
    line = one_line_error(run_cli("eval_smooth", "--smooth_model_dir", model_dir, "--xy_path", cache_path,
                                  "--out_json", tmp_path / "r.json", "--ranks", "8", "--qspecs", "nvfp4@16"))
    assert "has no smooth_factor buffer" in line and "model.layers.0.self_attn.q_proj" in line
    assert files_under(tmp_path) == []


def test_smooth_bad_alpha_and_nonempty_out(qwen3, tmp_path):
    model_dir, cache_path = qwen3
    assert "--alpha" in one_line_error(run_cli("smooth", "--model_dir", model_dir, "--xy_path", cache_path,
                                               "--out_dir", tmp_path / "s", "--alpha", "1.5"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert "--out_dir" in one_line_error(run_cli("smooth", "--model_dir", model_dir, "--xy_path", cache_path,
                                                 "--out_dir", tmp_path / "busy"))


def test_cache_stale_after_model_change(qwen3, tmp_path):
    model_dir, cache_path = qwen3
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    from safetensors.torch import load_file

    w = load_file(str(changed / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"] * 1.01
    save_file(w, str(changed / "model.safetensors"), metadata={"format": "pt"})
    line = one_line_error(run_cli("eval_fake", "--model_dir", changed, "--xy_path", cache_path, "--out_json",
                                  tmp_path / "r.json", "--ranks", "8", "--qspecs", "nvfp4@16"))
    assert "different model" in line and "save_xy" in line


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype, unit", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_error_matmul_16bit_path_is_within_its_documented_bound(x_dtype, unit):
    """ErrorMatmul on CUDA with a 16-bit cache: X as stored (exact), M scaled by a power of two
    and rounded once to X's dtype (relative `unit`: 2^-11 fp16, 2^-8 bf16; fp16 entries below
    its normal range add at most 2^-25 of the scaled unit, i.e. amax(M)·2^-37), float32
    accumulation. Against float64: |XMᵀ - ref| <= (unit + K·2^-23)·|X||M|ᵀ + K·amax|X|·amax(M)·2^-37."""
    g = torch.Generator().manual_seed(0)
    k = 384
    x = (torch.randn(512, k, generator=g) * 3).to(x_dtype)  # a cache's values: exact in x_dtype
    m = torch.randn(256, k, generator=g) * 1e-3
    m[:, :7] *= 300.0  # outlier columns set the scale
    m[::5] *= 1e-6  # rows far below the largest entry (fp16 subnormals after the shift)
    m[3, 3] = 0.0
    mm = evaluate.ErrorMatmul("cuda", x_dtype)
    assert mm.low == x_dtype
    got = mm((x.cuda(), 1.0), mm.prepare(m.cuda()))
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    got = got.cpu().double()
    ref = x.double() @ m.double().T
    bound = (unit + k * 2.0**-23) * (x.double().abs() @ m.double().abs().T)
    bound += k * x.double().abs().max() * m.abs().max().double() * 2.0**-37
    excess = (got - ref).abs() - bound
    assert excess.max().item() <= 0, excess.max().item()
    # the bound is not vacuous: the rounding of M is visible, at the documented size
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 4 * unit, rel
    # split(): M = hi + lo, two GEMMs summed, for the reference X·Wᵀ: M's rounding drops to
    # about unit² relative ("~22 significant bits" for fp16), plus the subnormal and float32 terms
    parts = mm.split(m.cuda())
    assert len(parts) == 2
    got2 = sum(mm((x.cuda(), 1.0), p) for p in parts).cpu().double()
    bound2 = (2 * unit**2 + k * 2.0**-23) * (x.double().abs() @ m.double().abs().T)
    bound2 += 2 * k * x.double().abs().max() * m.abs().max().double() * 2.0**-37
    assert ((got2 - ref).abs() - bound2).max().item() <= 0
    assert ((got2 - ref).norm() / ref.norm()).item() < 0.1 * rel
    # an fp32 cache, or the CPU, stays float32 (no rounding of M): float32 accuracy
    for device, dtype in (("cuda", torch.float32), ("cpu", x_dtype)):
        plain = evaluate.ErrorMatmul(device, dtype)
        assert plain.low is None and plain.prepare(m)[1] == 1.0


@pytest.fixture(scope="module")
def qwen2_fp16(demo_model_dirs, tmp_path_factory):
    """The qwen2 demo model and an fp16 cache of it (the ErrorMatmul 16-bit path)."""
    out = tmp_path_factory.mktemp("engine16")
    cache = save_xy(demo_model_dirs["qwen2"], out, "c", cn=3, eu=5, length=25, save_dtype="fp16", **QUIET)
    return demo_model_dirs["qwen2"], cache


@pytest.mark.cuda
@pytest.mark.parametrize("cache_kind", ["fp16", "fp32"])
def test_metrics_on_cuda_match_float64_reference(qwen2, qwen2_fp16, cache_kind):
    """The engine on the GPU against float64 numpy metrics of the same W~. fp32 cache: the sums
    (sse, denom, nmse, sqnr) within 1e-4, per-token norms within 5e-4. fp16 cache (the 16-bit
    ErrorMatmul path, ΔW rounded once to fp16): within 2·2^-11, the bound of one 2^-11 relative
    rounding of ΔW on a squared norm. Measured on the H200: 1.14e-4 on layer 0's v_proj, whose
    planted outlier channels let a few entries of ΔW dominate XᵀX; emulating the fp16 rounding
    of ΔW on the CPU in float64 gives the GPU's nmse to 5.6e-7 relative."""
    model_dir, cache_path = qwen2_fp16 if cache_kind == "fp16" else qwen2
    cache, mdir = XYCache(cache_path), ModelDir(model_dir)
    grid = build_grid([0, 8], parse_qspecs("nvfp4@16,int4_asym@32"), "full")
    stats = evaluate.EngineStats()
    results = evaluate.evaluate_grid(cache, evaluate.CheckpointWeights(mdir, False), grid, 37, "cuda",
                                     progress=False, stats=stats)
    assert stats.weights == len(cache.targets)
    for target in cache.targets:
        e = cache.entry(target)
        x, y = cache.rows(e.x_key, 0, cache.n_tokens), cache.rows(e.y_key, 0, cache.n_tokens)
        w, b = mdir.read(target.path + ".weight"), mdir.read(target.path + ".bias")
        for cfg in grid:
            w_tilde = fake_quantize_weight(w.float().cuda(), cfg).cpu()  # the GPU's own W~ (its eigh)
            ref = reference_metrics(x, y, w_tilde, b)
            got = results[(target.layer, target.block, target.proj)][cfg.key]
            for name, value in ref.items():
                rel = 2 * 2.0**-11 if cache_kind == "fp16" else 5e-4 if name.startswith("token_") else 1e-4
                assert got[name] == pytest.approx(value, rel=rel), (target.path, cfg.key, name)


# ---------------------------------------------------------------- one pass over X per input group


@pytest.fixture(scope="module")
def compact(demo_model_dirs, tmp_path_factory):
    """The qwen2 demo model (q/k/v biases), a compact fp16 cache of it (q/k/v and gate/up share one
    X key, no Y) and the model smoothed on it."""
    from tokenwise_harness.calib.smooth import smooth

    out = tmp_path_factory.mktemp("compact")
    model = demo_model_dirs["qwen2"]
    cache = save_xy(model, out, "c", cn=3, eu=5, length=25, compact=True, **QUIET)
    smoothed = smooth(model, cache, out / "smoothed", alpha=0.5, log=lambda msg: None)
    return model, cache, smoothed


def _x_bytes(cache: XYCache) -> dict[str, int]:
    """Each stored X tensor's size in bytes."""
    from tokenwise_harness.cache import _ITEMSIZE

    keys = {cache.entry(t).x_key for t in cache.targets}
    return {k: _ITEMSIZE[cache.shapes[k][0]] * cache.shapes[k][1][0] * cache.shapes[k][1][1] for k in keys}


W4A4_GRID = build_grid([0, 8], parse_qspecs("nvfp4@16,int4@32"), "full", parse_qspecs("int4@64"))


@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_grouped_pass_is_bit_identical_to_one_pass_per_weight(compact, smoothed):
    model, cache_path, smoothed_dir = compact
    cache = XYCache(cache_path)
    source = evaluate.CheckpointWeights(ModelDir(smoothed_dir if smoothed else model), smoothed)
    assert len(_x_bytes(cache)) < len(cache.targets)  # the layout shares X: there is something to group
    grouped = evaluate.evaluate_grid(cache, source, W4A4_GRID, 37, "cpu", progress=False)
    alone = {}
    for target in cache.targets:
        alone.update(evaluate.evaluate_grid(cache, source, W4A4_GRID, 37, "cpu", targets=[target], progress=False))
    assert grouped == alone  # exact: every float of every metric


def test_siblings_with_different_smooth_factors_each_divide_x_by_their_own(compact):
    """A smoothed dir made elsewhere may give q/k/v different factors: X / s stays per weight."""
    import torch

    from tokenwise_harness.allowlist import Target

    model, cache_path, smoothed_dir = compact
    cache = XYCache(cache_path)
    source = evaluate.CheckpointWeights(ModelDir(smoothed_dir), True)
    grid = build_grid([8], parse_qspecs("nvfp4@16"), "combined")
    members = []
    for scale, proj in ((1.0, "q_proj"), (2.0, "k_proj"), (1.0, "v_proj")):
        target = Target(0, "self_attn", proj)
        triple = source.get(target, "cpu")
        # W·diag(s·c) with X / (s·c): the same function, a different factor
        triple = evaluate.WeightTriple(triple.weight * scale, triple.bias, triple.smooth * scale)
        terms = {cfg.key: fake_quantize_weight(triple.weight, cfg) for cfg in grid}
        members.append(evaluate.Member(target, triple, terms))
    assert evaluate._distinct_smooth([m.triple.smooth for m in members]) == [0, 1, 0]
    together = evaluate.evaluate_weights(cache, members, 37, "cpu")
    for m in members:
        assert together[m.target] == evaluate.evaluate_weight(XYCache(cache_path), m.target, m.triple, m.terms, 37,
                                                              "cpu")
    k = Target(0, "self_attn", "k_proj")
    assert together[k] != evaluate.evaluate_weights(cache, [members[0], evaluate.Member(
        k, evaluate.WeightTriple(members[1].triple.weight, members[1].triple.bias, members[0].triple.smooth),
        members[1].terms)], 37, "cpu")[k]  # k's own factor is what it was scored with
    assert torch.equal(members[0].triple.smooth, members[2].triple.smooth)


def test_each_cached_x_is_read_once_by_eval_fake(compact):
    """The CLI's path (run.Evaluation) streams every stored X tensor exactly once, whatever
    number of projections read it (bytes counted by the real reader)."""
    model, cache_path, _ = compact
    ev = Evaluation(EvalSpec.from_text("0,8", "nvfp4@16,int4@32", model_dir=str(model), xy_path=str(cache_path),
                                       device="cpu"))
    results = ev.score()
    assert len(results) == len(ev.cache.targets)
    assert dict(ev.cache.bytes_served) == _x_bytes(ev.cache)


def test_seed_layout_siblings_with_one_checksum_read_one_x(qwen2):
    """A seed-layout cache stores q/k/v's (and gate/up's) identical X once per projection; their
    equal checksums make the engine stream each distinct X once, scoring exactly as one pass per weight."""
    model, cache_path = qwen2
    cache = XYCache(cache_path)
    stored_x = [k for k in cache.shapes if k.endswith(".X")]
    assert len(stored_x) == len(cache.targets) and not cache.x_aliases  # the seed layout: one X per projection
    q, k = (next(t for t in cache.targets if t.layer == 0 and t.proj == p) for p in ("q_proj", "k_proj"))
    assert cache.entry(k).x_key == cache.entry(q).x_key == q.path + ".X"
    distinct = _x_bytes(cache)
    assert len(distinct) < len(stored_x)
    ev = Evaluation(EvalSpec.from_text("0,8", "nvfp4@16", model_dir=str(model), xy_path=str(cache_path),
                                       device="cpu"))
    grouped = ev.score()
    assert {key: n for key, n in ev.cache.bytes_served.items() if key.endswith(".X")} == distinct
    source = evaluate.CheckpointWeights(ModelDir(model), False)
    grid = build_grid([0, 8], parse_qspecs("nvfp4@16"))
    for target in cache.targets:
        alone = evaluate.evaluate_grid(XYCache(cache_path), source, grid, 37, "cpu", targets=[target], progress=False)
        assert alone[(target.layer, target.block, target.proj)] == grouped[(target.layer, target.block, target.proj)]


def test_a_sibling_x_whose_bytes_differ_from_its_checksum_fails_the_run(qwen2, tmp_path):
    """Equal recorded checksums are trusted only because every tensor is still checked: a k_proj X
    whose bytes were changed in place (its checksum still q's) fails eval_fake with one line, exit 2."""
    model, cache_path = qwen2
    bad = tmp_path / "bad.safetensors"
    shutil.copy(cache_path, bad)
    cache = XYCache(bad)
    key = next(t for t in cache.targets if t.layer == 0 and t.proj == "k_proj").path + ".X"
    with open(bad, "r+b") as fh:
        fh.seek(cache.offsets[key] + 40)
        fh.write(b"\x00\x00\x80\x3f")  # one fp32 element set to 1.0
    proc = run_cli("eval_fake", f"--model_dir={model}", f"--xy_path={bad}", "--ranks=8", "--qspecs=nvfp4@16",
                   f"--out_json={tmp_path / 'r.json'}", "--device=cpu")
    assert f"tensor {key} fails its checksum" in one_line_error(proc)
    assert not (tmp_path / "r.json").exists()


def test_a_group_whose_deltas_do_not_fit_is_split_and_scores_the_same(compact, monkeypatch):
    model, cache_path, _ = compact
    source = evaluate.CheckpointWeights(ModelDir(model), False)
    whole = XYCache(cache_path)
    expected = evaluate.evaluate_grid(whole, source, W4A4_GRID, 37, "cpu", progress=False)
    # room for two ΔW of the largest weight: a gate/up pair of 2 x 6 configs needs 6 passes
    largest = max(source.get(t, "cpu").weight.numel() for t in whole.targets)
    monkeypatch.setattr(evaluate, "DELTA_BUDGET_BYTES", 2 * 6 * largest)
    split = XYCache(cache_path)
    assert evaluate.evaluate_grid(split, source, W4A4_GRID, 37, "cpu", progress=False) == expected
    sizes = _x_bytes(split)
    gate_up = whole.entry(next(t for t in whole.targets if t.proj == "up_proj")).x_key
    assert split.bytes_served[gate_up] == 6 * sizes[gate_up]
    assert dict(whole.bytes_served) == sizes


def test_pass_plan_packs_whole_configs_into_the_budget(monkeypatch):
    from tokenwise_harness.allowlist import Target

    q, k = Target(0, "self_attn", "q_proj"), Target(0, "self_attn", "k_proj")
    cfgs = build_grid([0, 8], parse_qspecs("nvfp4@16"), "full")  # 3 configs
    monkeypatch.setattr(evaluate, "DELTA_BUDGET_BYTES", 6 * 100 * 4)
    # q's 3 ΔW take 3 x 600 bytes, two of k's (300 each) fill the rest: k's third waits for a second pass
    assert evaluate.pass_plan([(q, 100, cfgs), (k, 50, cfgs)]) == [{q: cfgs, k: cfgs[:2]}, {k: cfgs[2:]}]
    monkeypatch.setattr(evaluate, "DELTA_BUDGET_BYTES", 1)  # never less than one ΔW per pass
    assert evaluate.pass_plan([(q, 100, cfgs[:2])]) == [{q: cfgs[:1]}, {q: cfgs[1:2]}]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_prepare_weights_runs_while_waiting_once_before_the_first_weight(qwen2, device):
    """The hook evaluate_plan page-locks the arena in runs on the caller's thread once, after the
    first reads are queued and before any weight is handed out; every weight still comes, in order."""
    model_dir, cache_path = qwen2
    cache = XYCache(cache_path)
    targets = cache.targets[:3]
    grid = build_grid([8], parse_qspecs("nvfp4@16"), "combined")
    events = []
    items = evaluate.prepare_weights(evaluate.CheckpointWeights(ModelDir(model_dir), False), {t: grid for t in targets},
                                     device, 8, evaluate.EngineStats(), while_waiting=lambda: events.append("waiting"))
    for item in items:
        events.append(item.target)
    assert events == ["waiting", *targets]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_first_launches_score_random_data_through_the_engine_and_change_no_result(qwen2, device, monkeypatch):
    """evaluate_plan's warm-up (CUDA) scores one chunk of random data of the first target's shapes
    with its one-shot configs, W4A4 included, through _WeightScore; it reads nothing from the
    cache, and the scores of a run after it equal those of a run without it."""
    model_dir, cache_path = qwen2
    grid = build_grid([8], parse_qspecs("nvfp4@16"), "combined") + [SvdqConfig(8, "nvfp4", 16, afmt="nvfp4", ablk=16)]
    cache = XYCache(cache_path)
    target = cache.targets[0]
    assert cache.entry(target).out_dim is not None
    updates = []
    update = evaluate._WeightScore.update
    monkeypatch.setattr(evaluate._WeightScore, "update",
                        lambda self, chunk, y, n, stats, finite: (updates.append((self.target, sorted(self.terms), n)),
                                                                  update(self, chunk, y, n, stats, finite)))
    served = dict(cache.bytes_served)
    evaluate.first_launches(cache, target, grid, 16, device)
    assert updates == [(target, sorted(c.key for c in grid), 16)]
    assert dict(cache.bytes_served) == served

    def scores(warm):
        if not warm:
            monkeypatch.setattr(evaluate, "first_launches", lambda *a: updates.append("skipped"))
        plan = {t: grid for t in cache.targets[:4]}
        return evaluate.evaluate_plan(XYCache(cache_path), evaluate.CheckpointWeights(ModelDir(model_dir), False), plan,
                                      16, device, progress=False)

    assert scores(True) == scores(False)
    assert ("skipped" in updates) == device.startswith("cuda")  # evaluate_plan warms up on CUDA only
