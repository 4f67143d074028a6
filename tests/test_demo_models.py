"""Offline demo models: loadable by Auto* classes, deterministic, with visible planted outliers."""

import json
import time

import pytest
import torch

from tokenwise_harness.allowlist import iter_allowed_linears, parse_target
from tokenwise_harness.capture.data import get_veri_data
from tokenwise_harness.demo.models import (
    build_demo,
    demo_info,
    make_demo_model,
    make_demo_tokenizer,
    planted_outliers,
)
from tokenwise_harness.errors import HarnessError

MODEL_CLASSES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MIXED_TEXT = "今天的天气很好，我们去公园散步吧。The 3 quick foxes jumped 12345 times! Привет, ça va?\n"


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def capture_inputs(model, batch) -> dict[str, torch.Tensor]:
    """Input activation [tokens, in_features] of every allowlisted linear, via forward hooks."""
    inputs = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, path=t.path: inputs.__setitem__(path, args[0].reshape(-1, mod.in_features)))
        for t, module in iter_allowed_linears(model)
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@pytest.fixture(scope="module")
def small_batch(demo_tokenizer):
    return get_veri_data(demo_tokenizer, 0, 8, 64, 8, 64, "cpu")


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_loads_offline_and_gives_finite_logits(demo_model_dirs, small_batch, family):
    model_dir = demo_model_dirs[family]
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin"))
    model, tok = load(model_dir)
    assert type(model).__name__ == MODEL_CLASSES[family]
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 160)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 1024)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)  # head_dim = 64 / 4
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    with torch.no_grad():
        logits = model(**small_batch).logits
    assert logits.shape == (16, 64, 1024)
    assert bool(torch.isfinite(logits).all())
    assert 0.1 < logits.std().item() < 100


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_tokenizer_round_trip_and_special_tokens(demo_model_dirs, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dirs[family])
    assert len(tok) == 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|endoftext|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == MIXED_TEXT
    # whichever tokenizer class transformers picks for the family, it encodes like the trained one
    assert ids == make_demo_tokenizer()(MIXED_TEXT, add_special_tokens=False)["input_ids"]


def test_chinese_is_compressed_by_the_trained_merges(demo_tokenizer):
    text = "天气预报说明天有大到暴雨，出门的时候记得带上雨伞。"
    n_bytes = len(text.encode("utf-8"))
    assert len(demo_tokenizer(text, add_special_tokens=False)["input_ids"]) < n_bytes / 2


def test_qwen2_has_random_qkv_biases(demo_model_dirs):
    qwen2, _ = load(demo_model_dirs["qwen2"])
    for layer in qwen2.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.bias is not None
            assert bool((proj.bias != 0).all()) and proj.bias.std() > 0.05
        assert attn.o_proj.bias is None
    for family in ("qwen3", "llama"):
        model, _ = load(demo_model_dirs[family])
        assert all(m.bias is None for _, m in iter_allowed_linears(model))


def test_outliers_are_recorded(demo_model_dir):
    info = demo_info(demo_model_dir)
    assert info["family"] == "qwen3" and info["seed"] == 0 and info["outlier_layers"] == [0]
    outliers = planted_outliers(demo_model_dir)
    assert len(outliers) == 7  # every projection of layer 0, none of layer 1
    model, _ = load(demo_model_dir)
    in_features = {t.path: m.in_features for t, m in iter_allowed_linears(model)}
    for path, channels in outliers.items():
        assert parse_target(path) is not None and parse_target(path).layer == 0
        assert channels == sorted(set(channels)) and all(0 <= c < in_features[path] for c in channels)
        assert len(channels) >= 4


def test_planted_outliers_dominate_q_proj_input(demo_model_dir, small_batch):
    model, _ = load(demo_model_dir)
    x = capture_inputs(model, small_batch)["model.layers.0.self_attn.q_proj"]
    channel_max = x.abs().amax(dim=0)
    planted = planted_outliers(demo_model_dir)["model.layers.0.self_attn.q_proj"]
    rest = [c for c in range(x.shape[1]) if c not in planted]
    assert channel_max[planted].min() > 5 * channel_max[rest].max()


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_planted_outliers_visible_in_every_planted_projection(demo_model_dirs, small_batch, family):
    model, _ = load(demo_model_dirs[family])
    inputs = capture_inputs(model, small_batch)
    for path, planted in planted_outliers(demo_model_dirs[family]).items():
        rms = inputs[path].pow(2).mean(dim=0).sqrt()
        rest = rms[[c for c in range(rms.numel()) if c not in planted]]
        # ~outlier_scale (20) x the typical channel, and above even the largest ordinary one
        assert rms[planted].min() > 5 * rest.median(), path
        assert rms[planted].min() > 1.5 * rest.max(), path
    # the unplanted layer has no channel standing out like that
    for path, x in inputs.items():
        if path.startswith("model.layers.1."):
            rms = x.pow(2).mean(dim=0).sqrt()
            assert rms.max() < 6 * rms.median(), path


def test_activations_are_unit_scale(demo_model_dir, small_batch):
    model, _ = load(demo_model_dir)
    inputs = capture_inputs(model, small_batch)
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        assert 0.3 < inputs[path].std().item() < 3, path
    assert 0.05 < inputs["model.layers.1.mlp.down_proj"].std().item() < 3


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, demo_model_dir):
    a, _ = build_demo("qwen3", seed=0)
    b, _ = build_demo("qwen3", seed=0)
    c, _ = build_demo("qwen3", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    # and on disk: a rebuild with the same seed writes byte-identical files
    again = make_demo_model("qwen3", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (demo_model_dir / name).read_bytes(), name


def test_building_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    build_demo("llama", seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_build_is_fast(tmp_path, demo_model_dir):
    """Tokenizer training and a model build each take < 3 s of CPU time.

    CPU time rather than wall time: other jobs sharing the machine stretch wall time
    without saying anything about this code.
    """
    from tokenwise_harness.demo.models import _trained_tokenizer_json

    started = time.process_time()
    _trained_tokenizer_json.__wrapped__(512)  # training from scratch, bypassing the cache
    train_s = time.process_time() - started
    started = time.process_time()
    make_demo_model("qwen2", tmp_path / "m", seed=3, num_layers=4)
    build_s = time.process_time() - started
    assert train_s < 3 and build_s < 3, (train_s, build_s)


def test_sizes_are_configurable(tmp_path):
    out = make_demo_model("llama", tmp_path / "big", num_layers=3, hidden_size=96, intermediate_size=200,
                          num_heads=6, num_kv_heads=3, vocab_size=600, outlier_channels=2, outlier_scale=8.0)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (3, 96, 16)
    assert config["tokenwise_demo"]["outlier_layers"] == [0, 2]
    model, tok = load(out)
    assert len(tok) == 600 and model.model.layers[2].mlp.down_proj.weight.shape == (96, 200)
    for path, channels in planted_outliers(out).items():
        # each planted v row reaches the o_proj input of every query head sharing its kv head
        assert len(channels) == (2 * 6 // 3 if path.endswith("o_proj") else 2), path


def test_no_outliers_when_asked(tmp_path):
    out = make_demo_model("qwen3", tmp_path / "plain", outlier_channels=0)
    assert planted_outliers(out) == {} and demo_info(out)["outlier_layers"] == []


# --------------------------------------------------------------------------- errors and atomic writes


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(family="gpt2"), r"^--family: unknown model family 'gpt2'; choose one of qwen3, llama, qwen2$"),
        (dict(num_heads=5), r"^num_heads: "),
        (dict(num_kv_heads=3), r"^num_kv_heads: "),
        (dict(num_layers=0), r"^num_layers: "),
        (dict(vocab_size=100), r"^vocab_size: "),
        (dict(outlier_channels=65), r"^outlier_channels: "),
        (dict(outlier_scale=0.0), r"^outlier_scale: "),
    ],
)
def test_bad_arguments(tmp_path, kwargs, expected):
    args = dict(family="qwen3", out_dir=tmp_path / "m") | kwargs
    with pytest.raises(HarnessError, match=expected):
        make_demo_model(**args)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_refuses_non_empty_dir_unless_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HarnessError, match=r"^--out: .* is not empty; pass --overwrite"):
        make_demo_model("qwen3", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    make_demo_model("qwen3", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left


def test_empty_existing_dir_is_fine_and_a_file_is_not(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (make_demo_model("llama", tmp_path / "empty") / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(HarnessError, match=r"^--out: .* not a directory"):
        make_demo_model("llama", tmp_path / "file")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        make_demo_model("qwen3", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
