"""save_xy: the seed-format cache, on real Hugging Face model classes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.helpers import files_under, one_line_error, run_cli, run_cli_subprocess
from tokenwise_harness.allowlist import ALLOWED
from tokenwise_harness.cache import XYCache
from tokenwise_harness.capture.save_xy import save_xy

SMALL = dict(cn=3, eu=4, length=16, batch_size=3)
QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def qwen2_cache(demo_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    return save_xy(demo_model_dirs["qwen2"], out, "c", save_dtype="fp32", **SMALL, **QUIET)


def test_keys_are_exactly_the_allowlisted_modules(demo_model_dirs, qwen2_cache):
    with safe_open(str(qwen2_cache), "pt") as f:
        keys = set(f.keys())
    n_layers = json.loads((demo_model_dirs["qwen2"] / "config.json").read_text())["num_hidden_layers"]
    expected = {f"model.layers.{i}.{b}.{p}.{xy}" for i in range(n_layers) for b, p in ALLOWED for xy in "XY"}
    assert keys == expected
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)


def test_shapes_and_metadata(demo_model_dirs, qwen2_cache):
    cache = XYCache(qwen2_cache)
    n = (SMALL["cn"] + SMALL["eu"]) * SMALL["length"]
    assert cache.n_tokens == n
    model = AutoModelForCausalLM.from_pretrained(demo_model_dirs["qwen2"])
    mods = dict(model.named_modules())
    for e in cache.entries:
        lin = mods[e.target.path]
        assert (e.in_dim, e.out_dim) == (lin.in_features, lin.out_features)
    meta = cache.metadata
    for key, value in dict(seed="0", cn="3", eu="4", length="16", save_dtype="fp32").items():
        assert meta[key] == value
    assert len(meta["model_fingerprint"]) == 64 and len(meta["data_fingerprint"]) == 64
    assert meta["format_version"] == "1"
    cache.verify_checksums()


def test_y_is_the_linear_applied_to_x_biases_included(demo_model_dirs, qwen2_cache):
    cache = XYCache(qwen2_cache)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dirs["qwen2"])
    mods = dict(model.named_modules())
    assert mods["model.layers.0.self_attn.q_proj"].bias is not None
    for e in cache.entries:
        x = cache.rows(e.x_key, 0, cache.n_tokens).double()
        y = cache.rows(e.y_key, 0, cache.n_tokens).double()
        lin = mods[e.target.path]
        ref = x @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), e.target.path


def test_deterministic_and_fp16(demo_model_dir, tmp_path):
    a = save_xy(demo_model_dir, tmp_path / "a", "c", **SMALL, **QUIET)
    b = save_xy(demo_model_dir, tmp_path / "b", "c", **SMALL, **QUIET)
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.X").dtype == torch.float16
        assert f.metadata()["save_dtype"] == "fp16"


def test_extra_non_allowlisted_linear_is_ignored(demo_model_dir, tmp_path, monkeypatch):
    from tokenwise_harness.capture import save_xy as capture

    real = capture.load_model

    def with_extra(*args, **kw):
        model = real(*args, **kw)
        model.model.layers[0].mlp.extra_proj = torch.nn.Linear(4, 4)  # matches the regex, not the set
        model.model.layers[0].self_attn.q_proj_lora = torch.nn.Linear(4, 4)
        return model

    monkeypatch.setattr(capture, "load_model", with_extra)
    path = save_xy(demo_model_dir, tmp_path, "c", **SMALL, **QUIET)
    with safe_open(str(path), "pt") as f:
        assert not any("extra_proj" in k or "lora" in k for k in f.keys())


def test_pt_fallback_without_safetensors(demo_model_dir, tmp_path, monkeypatch):
    from tokenwise_harness import cache as cache_mod
    from tokenwise_harness.capture import save_xy as capture

    monkeypatch.setattr(capture, "have_safetensors", lambda: False)
    monkeypatch.setattr(cache_mod, "have_safetensors", lambda: False)
    path = save_xy(demo_model_dir, tmp_path, "c", **SMALL, **QUIET)
    assert path.suffix == ".pt"
    loaded = torch.load(path, weights_only=True)
    assert loaded["__metadata__"]["cn"] == "3"
    cache = XYCache(path)
    assert cache.n_tokens == 7 * 16 and len(cache.entries) == 14


def test_cli_save_xy_writes_seed_cache(demo_model_dir, tmp_path):
    proc = run_cli_subprocess("save_xy", "--model_dir", demo_model_dir, "--save_path", tmp_path / "c", "--label", "veri",
                   "--cn", 2, "--eu", 2, "--length", 8, "--save_dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert files_under(tmp_path / "c") == ["veri.safetensors"]


@pytest.mark.parametrize("args, flag", [
    (["--model_dir", "{tmp}/missing"], "--model_dir"),
    (["--torch_dtype", "fp12"], "--torch_dtype"),
    (["--save_dtype", "int8"], "--save_dtype"),
    (["--label", "a/b"], "--label"),
    (["--cn", "0", "--eu", "0"], "--cn"),
    (["--length", "0"], "--length"),
    (["--length", "-3"], "--length"),
    (["--cn", "100000"], "--cn"),
    (["--eu", "100000"], "--eu"),
    (["--length", "10000000"], "--length"),
    (["--save_path", "/proc/nope"], "--save_path"),
], ids=["missing-model", "dtype", "save-dtype", "label-sep", "counts-zero", "length-zero", "length-neg",
        "cn-too-many", "eu-too-many", "length-too-long", "unwritable"])
def test_bad_inputs_one_line_exit_2_nothing_written(demo_model_dir, tmp_path, args, flag):
    base = {"--model_dir": str(demo_model_dir), "--save_path": str(tmp_path / "out"), "--label": "c",
            "--cn": "2", "--eu": "2", "--length": "8"}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    proc = run_cli("save_xy", *[x for kv in base.items() for x in kv])
    line = one_line_error(proc)
    assert flag in line
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_compact_layout_stores_shared_inputs_once_and_scores_the_same(demo_model_dirs, qwen2_cache, tmp_path):
    from tokenwise_harness.run import EvalSpec, run_eval

    model_dir = demo_model_dirs["qwen2"]
    compact = save_xy(model_dir, tmp_path, "compact", save_dtype="fp32", compact=True, **SMALL, **QUIET)
    full, small = XYCache(qwen2_cache), XYCache(compact)
    with safe_open(str(compact), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.k_proj.X" not in keys and "model.layers.0.mlp.up_proj.X" not in keys
    assert not any(k.endswith(".Y") for k in keys)
    assert [e.target for e in small.entries] == [e.target for e in full.entries]
    k = small.entry(small.targets[1])
    assert k.target.proj == "k_proj" and k.x_key == "model.layers.0.self_attn.q_proj.X" and k.y_key is None
    assert torch.equal(small.rows(k.x_key, 0, 50), full.rows("model.layers.0.self_attn.k_proj.X", 0, 50))
    assert compact.stat().st_size < 0.4 * qwen2_cache.stat().st_size
    kw = dict(model_dir=str(model_dir))
    a = run_eval(EvalSpec.from_text("8", "nvfp4@16", xy_path=str(qwen2_cache), **kw), progress=False, log=print)
    b = run_eval(EvalSpec.from_text("8", "nvfp4@16", xy_path=str(compact), **kw), progress=False, log=print)
    for layer, blocks in a["by_layer"].items():
        for block, body in blocks.items():
            for proj, cfgs in body["by_proj"].items():
                for key, m in cfgs.items():
                    assert b["by_layer"][layer][block]["by_proj"][proj][key]["nmse"] == pytest.approx(m["nmse"], rel=1e-4)


@pytest.mark.cuda
def test_save_xy_on_cuda_matches_cpu_capture(demo_model_dirs, qwen2_cache, tmp_path):
    """--device cuda: the same keys, metadata and fingerprints as the CPU capture, Y = XWᵀ + b
    in float64, and X within float32 GPU-vs-CPU rounding of the CPU capture's X."""
    gpu_path = save_xy(demo_model_dirs["qwen2"], tmp_path, "c", save_dtype="fp32", device="cuda", **SMALL, **QUIET)
    cpu, gpu = XYCache(qwen2_cache), XYCache(gpu_path)
    assert [e.target for e in gpu.entries] == [e.target for e in cpu.entries]
    for key in ("model_fingerprint", "data_fingerprint", "n_tokens", "seed", "cn", "eu", "length", "save_dtype"):
        assert gpu.metadata[key] == cpu.metadata[key], key
    gpu.verify_checksums()
    model = AutoModelForCausalLM.from_pretrained(demo_model_dirs["qwen2"])
    mods = dict(model.named_modules())
    for e in gpu.entries:
        xg, yg = gpu.rows(e.x_key, 0, gpu.n_tokens).double(), gpu.rows(e.y_key, 0, gpu.n_tokens).double()
        xc = cpu.rows(e.x_key, 0, cpu.n_tokens).double()
        assert torch.allclose(xg, xc, rtol=1e-3, atol=1e-4 * xc.abs().max().item()), e.target.path
        lin = mods[e.target.path]
        ref = xg @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)
        assert torch.allclose(yg, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), e.target.path
