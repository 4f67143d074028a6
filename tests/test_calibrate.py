"""SVDQuant's calibration recipe (calibrate.py): Gram scoring, smoothing search, iterated branch.

Float64 references on small random layers with planted outlier channels, then the demo model
end to end (smooth --alpha search, eval_fake/eval_smooth --lowrank_iters, pytest --lowrank-iters).
"""

import json

import pytest
import torch

from tests.helpers import one_line_error, run_cli
from tests.oracles import fake_quantize_ref, truncated_svd64
from tokenwise_harness.cache import XYCache
from tokenwise_harness.calib import search as calibrate
from tokenwise_harness.calib.smooth import smooth
from tokenwise_harness.capture.save_xy import save_xy
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.grid import SvdqConfig
from tokenwise_harness.numerics import metrics, smoothing, svdq
from tokenwise_harness.numerics.lowrank import LowRank
from tokenwise_harness.numerics.smoothing import smooth_factor
from tokenwise_harness.numerics.svdq import fake_quantize_weight

pytest_plugins = ["pytester"]

QUIET = dict(progress=False, log=lambda msg: None)
SEARCH_CFG = SvdqConfig(8, "nvfp4", 16)


@pytest.fixture(autouse=True)
def one_thread():
    """These are many tiny linear-algebra calls: on a shared, loaded CPU two OpenMP threads
    make each one 10-30x slower than one thread (measured), so run them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    cache = save_xy(demo_model_dir, out, "c", cn=3, eu=3, length=32, save_dtype="fp32", **QUIET)
    return demo_model_dir, cache


def planted(seed=0, n=300, in_dim=48, outs=(48, 16, 16), k=3, scale=25.0):
    """X [n, in] float64 with k outlier input channels, and a group of weights reading it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g, dtype=torch.float64)
    x[:, torch.randperm(in_dim, generator=g)[:k]] *= scale
    ws = []
    for out in outs:  # a decaying spectrum plus noise, so the low-rank branch matters
        u = torch.randn(out, 8, generator=g) * torch.logspace(0, -1, 8)
        ws.append((u @ torch.randn(8, in_dim, generator=g) + 0.1 * torch.randn(out, in_dim, generator=g)).float())
    return x, ws


def direct_error(x64, w_tilde, w, s=None):
    """||(X/s)(W~' − W')ᵀ||² in float64, W' = W·s: the reference the Gram scoring must equal."""
    if s is None:
        return float(((x64 @ (w_tilde.double() - w.double()).T) ** 2).sum())
    w_s = w * s[None, :]
    return float((((x64 / s.double()) @ (w_tilde.double() - w_s.double()).T) ** 2).sum())


# ----------------------------------------------------------------------------- Gram scoring


def test_gram_error_equals_direct_float64():
    x, (w, *_) = planted()
    acc = metrics.GramAccumulator(x.shape[1])
    for start in range(0, x.shape[0], 70):  # chunked accumulation
        acc.update(x[start:start + 70])
    gram = acc.result()
    assert torch.equal(gram, gram.T) and acc.n_tokens == x.shape[0]
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-13, atol=0)
    torch.testing.assert_close(acc.amax, x.abs().amax(0), rtol=0, atol=0)
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert metrics.output_error(delta, gram) == pytest.approx(float(((x @ delta.T) ** 2).sum()), rel=1e-12)
    s = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    torch.testing.assert_close(metrics.scale_gram(gram, s), (x / s).T @ (x / s), rtol=1e-12, atol=0)


def test_cache_gram_matches_engine_sse(demo):
    """H from the cache scores a real config's ΔW as the engine's streamed SSE does."""
    from tokenwise_harness.run import EvalSpec, run_eval

    model_dir, cache_path = demo
    cache, mdir = XYCache(cache_path), ModelDir(model_dir)
    target = next(t for t in cache.targets if t.layer == 0 and t.proj == "o_proj")
    x = cache.rows(cache.entry(target).x_key, 0, cache.n_tokens).double()
    gram = calibrate.input_gram(cache, target, chunk_tokens=50)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-12, atol=1e-9)
    w = mdir.read(target.path + ".weight").float()
    cfg = SvdqConfig(8, "nvfp4", 16)
    err = metrics.output_error(fake_quantize_weight(w, cfg) - w, gram)
    rep = run_eval(EvalSpec.from_text("8", "nvfp4@16", model_dir=str(model_dir), xy_path=str(cache_path),
                                      device="cpu"), **QUIET)
    sse = rep["by_layer"]["0"]["self_attn"]["by_proj"]["o_proj"][cfg.key]["sse"]
    assert err == pytest.approx(sse, rel=1e-4)


# ----------------------------------------------------------------------------- smoothing search


def test_searched_smoothing_never_worse_than_any_fixed_alpha_float64():
    x, ws = planted()
    gram, amax = x.T @ x, x.abs().amax(0)
    choice = smoothing.search_group(ws, gram, amax, SEARCH_CFG)
    w_amax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)

    def ref(s):
        return sum(direct_error(x, fake_quantize_weight(w, SEARCH_CFG, smooth=s), w, s) for w in ws)

    # the chosen factor scores what a direct float64 evaluation says
    assert choice.error == pytest.approx(ref(choice.s), rel=1e-9)
    assert choice.baseline_error == pytest.approx(ref(torch.ones_like(amax, dtype=torch.float32)), rel=1e-9)
    fixed = {a: ref(smooth_factor(amax, w_amax, a)) for a in smoothing.ALPHA_GRID}
    assert choice.error <= min(fixed.values()) * (1 + 1e-9)
    assert choice.error <= choice.baseline_error
    assert choice.fixed_error == pytest.approx(fixed[0.5], rel=1e-9)
    assert choice.error < 0.5 * choice.baseline_error  # planted outliers: smoothing pays off
    assert len(choice.errors) == 1 + 2 * len(smoothing.ALPHA_GRID)
    assert (choice.a, choice.b) in choice.errors and choice.errors[(choice.a, choice.b)] == choice.error


def test_search_order_and_ties():
    """Candidates: s = 1 first, then b = 1 − a, then b = 0; the first of equal minima wins."""
    order = smoothing.smoothing_candidates()
    assert order[0] == (0.0, 0.0) and order[10] == (0.5, 0.5) and order[-1] == (0.95, 0.0)
    assert len(order) == len(set(order)) == 39
    x, ws = planted(seed=7)
    amax = x.abs().amax(0)
    s = smooth_factor(amax, torch.ones_like(amax), 0.0, beta=0.0)
    assert torch.equal(s, torch.ones_like(s))  # a = b = 0 is exactly no smoothing
    choice = smoothing.search_group(ws, x.T @ x, amax, SEARCH_CFG)
    assert choice.error == min(choice.errors.values())
    assert next(c for c in order if choice.errors[c] == choice.error) == (choice.a, choice.b)


# ----------------------------------------------------------------------------- iterated branch


def reference_iterates(w, rank, fmt, blk, steps):
    """L₀ = SVD_r(W), L_k = SVD_r(W − Q(W − L_{k−1})): torch.linalg.svd in float64 and the
    numpy/ml_dtypes format oracle (tests/oracles.py), no harness code."""
    out, branch, q = [], truncated_svd64(w, rank).float(), None
    for k in range(steps):
        if k:
            branch = truncated_svd64(w - q, rank).float()
        q = torch.from_numpy(fake_quantize_ref(w - branch, fmt, blk)).float()
        out.append(branch + q)
    return out


@pytest.mark.parametrize("fmt,blk", [("nvfp4", 16), ("int4", "in")])
def test_iterated_branch_never_worse_than_one_shot_float64(fmt, blk):
    x, (w, *_) = planted(seed=3)
    gram = x.T @ x
    cfg1 = SvdqConfig(8, fmt, blk)
    one_shot = fake_quantize_weight(w, cfg1)
    e0 = direct_error(x, one_shot, w)
    ref = [direct_error(x, wt, w) for wt in reference_iterates(w, 8, fmt, blk, 6)]
    for iters in (1, 2, 6, 40):
        res = svdq.iterated_lowrank(w, SvdqConfig(8, fmt, blk, iters=iters), gram)
        assert res.errors[0] == pytest.approx(e0, rel=1e-9)  # iterate 0 is the one-shot branch
        assert 1 <= res.iters_run <= iters
        assert res.errors[res.best_iter] == min(res.errors)
        assert direct_error(x, res.weight, w) == pytest.approx(min(res.errors), rel=1e-9)
        assert min(res.errors) <= res.errors[0] and direct_error(x, res.weight, w) <= e0 * (1 + 1e-9)
        if res.iters_run < iters:  # stopped: the last iterate did not improve on the best
            assert res.errors[-1] >= min(res.errors[:-1]) * (1 - svdq.IMPROVE_RTOL)
        n = min(res.iters_run, len(ref))
        assert res.errors[:n] == pytest.approx(ref[:n], rel=2e-3)  # the recipe, independently
    assert torch.equal(svdq.iterated_lowrank(w, cfg1, gram).weight, one_shot)
    from tokenwise_harness.numerics.formats import fake_quantize

    res = svdq.iterated_lowrank(w, SvdqConfig(8, fmt, blk, iters=6), gram)
    assert torch.equal(res.weight, res.branch + fake_quantize(w - res.branch, fmt, blk))  # W~ = L + Q(W − L)
    res = svdq.iterated_lowrank(w, SvdqConfig(8, fmt, blk, iters=6), gram)
    assert res.best_iter > 0 and min(res.errors) < 0.98 * e0  # it does refine on this layer


def test_fake_quantize_weight_gram_contract():
    x, (w, *_) = planted(seed=4)
    gram = x.T @ x
    with pytest.raises(HarnessError, match="needs their Gram matrix"):
        fake_quantize_weight(w, SvdqConfig(8, "nvfp4", 16, iters=3))
    with pytest.raises(HarnessError, match="must be >= 1"):
        fake_quantize_weight(w, SvdqConfig(8, "nvfp4", 16, iters=0), gram=gram)
    one = SvdqConfig(8, "nvfp4", 16)
    assert torch.equal(fake_quantize_weight(w, one, gram=gram), fake_quantize_weight(w, one))
    cfg3 = SvdqConfig(8, "nvfp4", 16, iters=3)
    lr = LowRank(w, 16)  # the engine's shared decomposition (max_rank above the config's rank)
    assert torch.equal(fake_quantize_weight(w, cfg3, lowrank=lr, gram=gram),
                       svdq.iterated_lowrank(w, cfg3, gram).weight)
    # nothing to iterate: rank-only and quant-only configs return the one-shot W~
    for cfg in (SvdqConfig(8, "none", None, iters=3), SvdqConfig(0, "nvfp4", 16, iters=3)):
        assert torch.equal(fake_quantize_weight(w, cfg, gram=gram),
                           fake_quantize_weight(w, SvdqConfig(cfg.rank, cfg.fmt, cfg.blk)))
    # smoothing: the Gram is that of X / s
    s = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(5)) + 0.5
    w_s = fake_quantize_weight(w, cfg3, smooth=s, gram=metrics.scale_gram(gram, s))
    res = svdq.iterated_lowrank(w * s, cfg3, metrics.scale_gram(gram, s))
    assert torch.equal(w_s, res.weight)
    # W4A4 configs cannot iterate through the engine yet: a clear error, not a wrong residual
    fn = svdq.with_gram(fake_quantize_weight, gram)
    with pytest.raises(HarnessError, match="act_qspecs"):
        fn(w, SvdqConfig(8, "nvfp4", 16, "nvfp4", 16, iters=3))


def test_calibration_is_deterministic(demo):
    model_dir, cache_path = demo
    mdir, cache = ModelDir(model_dir), XYCache(cache_path)
    f1, m1 = calibrate.search_factors(mdir, cache, SEARCH_CFG)
    f2, m2 = calibrate.search_factors(mdir, cache, SEARCH_CFG)
    assert m1 == m2 and f1.keys() == f2.keys() and all(torch.equal(f1[t], f2[t]) for t in f1)
    x, (w, *_) = planted(seed=6)
    cfg = SvdqConfig(8, "nvfp4", 16, iters=10)
    a, b = svdq.iterated_lowrank(w, cfg, x.T @ x), svdq.iterated_lowrank(w, cfg, x.T @ x)
    assert torch.equal(a.weight, b.weight) and a.errors == b.errors


@pytest.mark.cuda
def test_smoothing_search_on_cuda_matches_cpu_and_float64(demo):
    """The search on the GPU: the same choice as on the CPU, errors equal to a float64 direct
    evaluation, factors on the CPU afterwards; and search_factors with device="cuda"."""
    x, ws = planted(seed=9)
    gram, amax = x.T @ x, x.abs().amax(0)
    cpu = smoothing.search_group(ws, gram, amax, SEARCH_CFG)
    gpu = smoothing.search_group([w.cuda() for w in ws], gram.cuda(), amax.cuda(), SEARCH_CFG)
    assert gpu.s.device.type == "cpu" and gpu.errors.keys() == cpu.errors.keys()
    # The formats are bit-identical across devices; the GPU's eigh differs from the CPU's in
    # the last float32 bits of the branch, which can flip a residual code now and then: 1e-3.
    for c, e in cpu.errors.items():
        assert gpu.errors[c] == pytest.approx(e, rel=1e-3), c
    assert gpu.error == min(gpu.errors.values()) and gpu.error == pytest.approx(cpu.error, rel=1e-3)
    ref = sum(direct_error(x, fake_quantize_weight(w, SEARCH_CFG, smooth=gpu.s), w, gpu.s) for w in ws)
    assert gpu.error == pytest.approx(ref, rel=1e-3)  # float64 direct evaluation of the chosen s
    model_dir, cache_path = demo
    mdir, cache = ModelDir(model_dir), XYCache(cache_path)
    f_cpu, m_cpu = calibrate.search_factors(mdir, cache, SEARCH_CFG, device="cpu")
    f_gpu, m_gpu = calibrate.search_factors(mdir, cache, SEARCH_CFG, device="cuda")
    assert m_gpu.keys() == m_cpu.keys() and f_gpu.keys() == f_cpu.keys()
    for g, m in m_cpu.items():
        assert m_gpu[g]["error"] == pytest.approx(m["error"], rel=1e-3), g
        assert m_gpu[g]["baseline_error"] == pytest.approx(m["baseline_error"], rel=1e-3), g


@pytest.mark.cuda
def test_iterated_branch_on_cuda_matches_float64_reference():
    x, (w, *_) = planted(seed=3)
    gram = x.T @ x
    res = svdq.iterated_lowrank(w.cuda(), SvdqConfig(8, "nvfp4", 16, iters=6), gram.cuda())
    assert res.weight.device.type == "cuda"
    ref = [direct_error(x, wt, w) for wt in reference_iterates(w, 8, "nvfp4", 16, 6)]
    n = min(res.iters_run, len(ref))
    assert res.errors[:n] == pytest.approx(ref[:n], rel=2e-3)
    assert direct_error(x, res.weight.cpu(), w) == pytest.approx(min(res.errors), rel=1e-9)


# ----------------------------------------------------------------------------- end to end


def _by_proj(rep):
    return {(layer, block, proj): cfgs for layer, blocks in rep["by_layer"].items()
            for block, b in blocks.items() for proj, cfgs in b["by_proj"].items()}


def test_smooth_alpha_search_cli_then_eval_smooth(demo, tmp_path):
    from tokenwise_harness.calib.smooth import compute_factors

    model_dir, cache_path = demo
    proc = run_cli("smooth", "--model_dir", model_dir, "--xy_path", cache_path, "--out_dir", tmp_path / "s",
                   "--alpha", "search", "--search_rank", "8", "--search_qspec", "nvfp4@16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "s" / "tokenwise_smooth.json").read_text())
    assert meta["alpha"] == "search" and meta["search"] == {
        "qspec": "nvfp4@16", "rank": 8, "alpha_grid": list(smoothing.ALPHA_GRID),
        "objective": "sum over the group's projections of tr(dW' H_s dW'^T)"}
    groups = {f"model.layers.{i}.{g}" for i in (0, 1) for g in ("self_attn.qkv", "self_attn.o", "mlp.gate_up",
                                                                 "mlp.down")}
    assert set(meta["alphas"]) == groups
    for g, c in meta["alphas"].items():
        assert {"a", "b", "error", "baseline_error"} <= set(c)
        assert c["error"] <= c["baseline_error"] and c["error"] <= c["fixed_error"], g
        assert c["b"] in (0.0, round(1 - c["a"], 10)), g
    # layer 0 has planted outliers: the searched factors beat no smoothing there by far
    assert meta["alphas"]["model.layers.0.mlp.gate_up"]["error"] < 0.2 * meta["alphas"][
        "model.layers.0.mlp.gate_up"]["baseline_error"]

    # never worse than any fixed alpha's factors, scored the same way (independent path: compute_factors)
    mdir, cache = ModelDir(model_dir), XYCache(cache_path)
    members: dict[str, list] = {}
    for t in mdir.targets():
        members.setdefault(t.input_group, []).append(t)
    for alpha in (0.25, 0.5, 0.75):
        fixed = compute_factors(mdir, cache, alpha)
        for g, ts in members.items():
            gram = calibrate.input_gram(cache, ts[0])
            err = smoothing.smoothed_error([mdir.read(t.path + ".weight").float() for t in ts], gram, fixed[ts[0]],
                                           SEARCH_CFG)
            assert meta["alphas"][g]["error"] <= err * (1 + 1e-9), (g, alpha)

    # eval_smooth scores the searched model; its report carries the exponents
    smooth(model_dir, cache_path, tmp_path / "f", alpha=0.5, log=lambda m: None)
    reports = {}
    for name in ("s", "f"):
        out = tmp_path / f"{name}.json"
        proc = run_cli("eval_smooth", "--smooth_model_dir", tmp_path / name, "--xy_path", cache_path,
                       "--out_json", out, "--ranks", "8", "--qspecs", "nvfp4@16", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads(out.read_text())
    assert reports["s"]["meta"]["smooth_meta"]["alphas"] == meta["alphas"]
    assert reports["s"]["meta"]["smooth_meta"]["alpha"] == "search"
    assert "alphas" not in reports["f"]["meta"]["smooth_meta"]  # --alpha 0.5: today's behaviour
    key = SEARCH_CFG.key
    for g, ts in members.items():  # the group SSE the search minimised, as the engine measures it
        sse = {n: sum(_by_proj(r)[(str(t.layer), t.block, t.proj)][key]["sse"] for t in ts)
               for n, r in reports.items()}
        assert sse["s"] <= sse["f"] * (1 + 1e-5), g


def test_alpha_and_iters_bad_values(demo, tmp_path):
    model_dir, cache_path = demo
    assert "--alpha" in one_line_error(run_cli("smooth", "--model_dir", model_dir, "--xy_path", cache_path,
                                               "--out_dir", tmp_path / "s", "--alpha", "searching"))
    assert "--search_qspec" in one_line_error(run_cli(
        "smooth", "--model_dir", model_dir, "--xy_path", cache_path, "--out_dir", tmp_path / "s", "--alpha",
        "search", "--search_qspec", "nvfp9@16"))
    assert "--lowrank_iters" in one_line_error(run_cli(
        "eval_fake", "--model_dir", model_dir, "--xy_path", cache_path, "--out_json", tmp_path / "r.json",
        "--lowrank_iters", "0"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "r.json").exists()


def test_eval_fake_lowrank_iters_cli(demo, tmp_path):
    model_dir, cache_path = demo
    reports = {}
    for iters in (1, 3):
        out = tmp_path / f"i{iters}.json"
        proc = run_cli("eval_fake", "--model_dir", model_dir, "--xy_path", cache_path, "--out_json", out,
                       "--ranks", "8,16", "--qspecs", "nvfp4@16,int4@32", "--grid_mode", "full",
                       "--lowrank_iters", str(iters), "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        reports[iters] = _by_proj(json.loads(out.read_text()))
    improved = 0
    for proj, cfgs in reports[1].items():
        iter_keys = set(reports[3][proj])
        for key, m in cfgs.items():
            k3 = key + ";iters=3" if not key.startswith("rank=0;") else key
            assert k3 in iter_keys, (proj, key, sorted(iter_keys))
            assert reports[3][proj][k3]["nmse"] <= m["nmse"], (proj, key)
            improved += reports[3][proj][k3]["nmse"] < 0.99 * m["nmse"]
    assert improved >= 10  # the refinement does something on the demo model
    assert "rank=0;fmt=nvfp4;blk=16" in reports[3][("0", "self_attn", "q_proj")]  # quant-only: no suffix


def test_pytest_lowrank_iters_generates_iters_ids(demo, pytester):
    model_dir, cache_path = demo
    args = [f"--model-dir={model_dir}", f"--xy-path={cache_path}", "--ranks=8", "--qspecs=nvfp4@16",
            "--lowrank-iters=3", "--device=cpu", f"--baselines-dir={pytester.path / 'bl'}",
            f"--rootdir={pytester.path}", "-p", "no:cacheprovider"]
    collected = pytester.runpytest_inprocess(*args, "--collect-only", "-q")
    ids = [line for line in collected.outlines if "layer" in line]
    assert len(ids) == 14 and all(line.endswith("rank8-nvfp4-blk16-iters3") for line in ids), ids
    ran = pytester.runpytest_inprocess(*args, "--update-baselines", "-k", "layer0- and q_proj")
    ran.assert_outcomes(passed=1)
