"""Small offline causal LMs for tests and demos: real Hugging Face model classes, random weights.

`make_demo_model("qwen3", DIR)` writes a directory that `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(DIR)` load with no network: a Qwen3 / Llama / Qwen2 config
with seeded random float32 weights, and a byte-level BPE tokenizer trained with the
`tokenizers` library on the embedded corpus (so Chinese and European text both tokenize
sensibly).

Weights (drawn from one seeded torch.Generator, in parameter-name order, so a seed fixes
every tensor regardless of how transformers would initialise them):
  * embeddings N(0, 1): after RMSNorm every projection sees unit-scale inputs;
  * linear weights N(0, 1/in_features): outputs stay unit-scale too, so activations are
    neither vanishing nor exploding through the small stack;
  * q/k/v biases (Qwen2) N(0, 0.2²): clearly nonzero, so bias handling is exercised;
  * norm weights 1.

Planted outliers: real LLMs have a few input channels far larger than the rest, which is
what SmoothQuant migrates into the weights and what the low-rank branch then absorbs. In
every even-numbered layer (layer 0, 2, ...) `outlier_channels` channels are made about
`outlier_scale` times larger than the typical (median) channel at four places, each giving
one set of projections large input channels:
  * input_layernorm weight      -> inputs of q_proj, k_proj, v_proj
  * post_attention_layernorm    -> inputs of gate_proj, up_proj
  * rows of up_proj             -> input of down_proj
  * rows of v_proj (and bias)   -> input of o_proj (attention mixes v rows, so the scaled
                                   channels of each kv head reach every query head sharing it)
The up_proj and v_proj rows are sized from activations measured on a small fixed batch of
the embedded corpus (see _plant_outliers for why).
Odd layers are left plain, so tests can contrast the two. The planted input channels of
each projection are recorded in config.json under `tokenwise_demo.outliers`
(module path -> sorted channel list); `planted_outliers(DIR)` reads them back.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

from tokenwise_harness.atomic import atomic_dir, check_not_input, check_writable_dir
from tokenwise_harness.errors import HarnessError

FAMILIES = ("qwen3", "llama", "qwen2")
DEMO_FORMAT = 1

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
MAX_POSITIONS = 4096
BIAS_STD = 0.2
CALIBRATION_SEED = 1234


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer():
    """Qwen2's pre-tokenization (regex split, then bytes), falling back to GPT-2's.

    transformers 5 always loads a `qwen2` model dir's tokenizer as Qwen2Tokenizer, which
    rebuilds the pre-tokenizer from its own pattern. Training every family's tokenizer with
    that same pattern makes the saved tokenizer encode identically whichever class loads it.
    """
    from tokenizers import Regex, pre_tokenizers

    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    except ImportError:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process and vocab size; return it serialised.

    Serialised so that every caller gets its own Tokenizer object (they are mutable).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from tokenwise_harness.capture.data import load_corpus

    corpus = load_corpus()
    texts = [s for lang in sorted(corpus) for s in corpus[lang]]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, PAD],
        # all 256 bytes up front: any text, in any script, can be encoded
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def make_demo_tokenizer(vocab_size: int = 1024):
    """A transformers fast tokenizer (bos/eos/pad set, no special tokens added on encode)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3:
        raise HarnessError(f"vocab_size: must be at least 259 (256 bytes + 3 special tokens), got {vocab_size}")
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_POSITIONS
    )


# --------------------------------------------------------------------------- model


def _config(family: str, *, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, tokenizer):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config_class = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,  # Qwen3's default (128) would not match a tiny model
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _check_shape_args(family, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                      outlier_channels, outlier_scale) -> None:
    if family not in FAMILIES:
        raise HarnessError(f"--family: unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("intermediate_size", intermediate_size),
                        ("vocab_size", vocab_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HarnessError(f"{name}: must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise HarnessError(f"num_heads: {num_heads} must divide hidden_size {hidden_size}")
    if num_heads % num_kv_heads:
        raise HarnessError(f"num_kv_heads: {num_kv_heads} must divide num_heads {num_heads}")
    kv_width = num_kv_heads * (hidden_size // num_heads)
    if not 0 <= outlier_channels <= min(hidden_size, intermediate_size, kv_width):
        raise HarnessError(
            f"outlier_channels: must be between 0 and {min(hidden_size, intermediate_size, kv_width)}, "
            f"got {outlier_channels}"
        )
    if not outlier_scale > 0:
        raise HarnessError(f"outlier_scale: must be > 0, got {outlier_scale}")


def _init_weights(model, generator) -> None:
    """Overwrite every parameter from `generator`, in name order (see module doc for the scales)."""
    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * BIAS_STD)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:  # linear weight [out, in]
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def _pick(generator, n: int, k: int) -> list[int]:
    import torch

    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def _calibration_batch(tokenizer) -> dict:
    """A small fixed batch to measure activations on (its own seed: tests sample seed 0)."""
    from tokenwise_harness.capture.data import get_veri_data

    return get_veri_data(tokenizer, CALIBRATION_SEED, 8, 64, 8, 64, "cpu")


def _channel_rms(model, batch, module, output: bool):
    """Per-channel RMS over all tokens of a module's input (or output) on `batch`."""
    import torch

    seen = []
    hook = module.register_forward_hook(lambda mod, args, out: seen.append(out if output else args[0]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    return x.pow(2).mean(dim=0).sqrt()


def _resize_rows(linear, rows: list[int], rms, scale: float) -> None:
    """Rescale some output rows of a linear so their RMS becomes ~scale x the median channel's.

    `rms` is the measured RMS of every output channel.

    The factor is rounded to a 1/16 step in log2, so last-bit differences in the measurement
    (another CPU, another attention kernel) almost never change the saved weights.
    """
    import torch

    factors = scale * rms.median() / rms[rows]
    factors = torch.exp2(torch.round(torch.log2(factors) * 16) / 16).float()
    linear.weight[rows] *= factors[:, None]
    if linear.bias is not None:
        linear.bias[rows] *= factors


def _plant_outliers(model, tokenizer, generator, k: int, scale: float) -> dict[str, list[int]]:
    """Plant k outlier channels at four places in every even layer; return module path -> input channels.

    The norm weights are scaled by `scale` directly: RMSNorm leaves every channel at a similar
    size, so that is `scale` x typical. The v_proj and up_proj rows are sized from measured
    activations instead: the planted norm channels make those outputs very uneven from channel
    to channel (each depends on its weights on the few large inputs), and a row scaled relative
    to itself could land below the big ordinary channels.
    """
    import torch

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    outliers: dict[str, list[int]] = {}
    if k == 0:
        return outliers
    batch = _calibration_batch(tokenizer)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i % 2:
                continue
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}"
            attn_in = _pick(generator, cfg.hidden_size, k)
            mlp_in = _pick(generator, cfg.hidden_size, k)
            down_in = _pick(generator, cfg.intermediate_size, k)
            v_rows = _pick(generator, cfg.num_key_value_heads * head_dim, k)

            layer.input_layernorm.weight[attn_in] *= scale
            layer.post_attention_layernorm.weight[mlp_in] *= scale
            # In this order: each measurement sees the layer's earlier plants.
            _resize_rows(attn.v_proj, v_rows, _channel_rms(model, batch, attn.v_proj, output=True), scale)
            _resize_rows(mlp.up_proj, down_in, _channel_rms(model, batch, mlp.down_proj, output=False), scale)

            # o_proj input channel (head h, dim d) reads kv head h // group at dim d.
            o_in = sorted(h * head_dim + r % head_dim for r in v_rows
                          for h in range(cfg.num_attention_heads) if h // group == r // head_dim)
            for proj in ("q_proj", "k_proj", "v_proj"):
                outliers[f"{prefix}.self_attn.{proj}"] = attn_in
            outliers[f"{prefix}.self_attn.o_proj"] = o_in
            outliers[f"{prefix}.mlp.gate_proj"] = mlp_in
            outliers[f"{prefix}.mlp.up_proj"] = mlp_in
            outliers[f"{prefix}.mlp.down_proj"] = down_in
    return outliers


@contextlib.contextmanager
def _single_thread(enabled: bool = True):
    """Run torch on one thread: the tensors of a demo-size model are tiny, and on a busy
    machine extra intra-op threads only spin on each other (a 0.2 s build took 4 s with two
    threads). Benchmark-size models (hidden > 1024) keep every thread."""
    import torch

    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_demo(
    family: str,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1024,
    outlier_channels: int = 4,
    outlier_scale: float = 20.0,
):
    """(model, tokenizer) in memory, exactly what make_demo_model saves."""
    _check_shape_args(family, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                      outlier_channels, outlier_scale)
    with _single_thread(enabled=hidden_size <= 1024):
        return _build(family, seed, num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                      vocab_size, outlier_channels, outlier_scale)


def _build(family, seed, num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, vocab_size,
           outlier_channels, outlier_scale):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_demo_tokenizer(vocab_size)
    config = _config(family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, tokenizer=tokenizer)
    # transformers initialises from the global RNG while constructing; fork it so building a
    # demo model leaves the caller's RNG state untouched (our own init overwrites it all).
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    _init_weights(model, generator)
    outliers = _plant_outliers(model, tokenizer, generator, outlier_channels, outlier_scale)
    model.config.tokenwise_demo = {
        "format": DEMO_FORMAT,
        "family": family,
        "seed": seed,
        "outlier_scale": outlier_scale,
        "outlier_layers": sorted({int(p.split(".")[2]) for p in outliers}),
        "outliers": outliers,
    }
    return model, tokenizer


def make_demo_model(family: str, out_dir, seed: int = 0, overwrite: bool = False, **shape) -> Path:
    """Build a demo model and save model + tokenizer (safetensors) to out_dir, atomically.

    `shape`: build_demo's size keywords (num_layers, hidden_size, intermediate_size, num_heads,
    num_kv_heads, vocab_size, outlier_channels, outlier_scale), defaults as there.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, tokenizer = build_demo(family, seed, **shape)
    with atomic_dir(out_dir, "--out") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared while we built
    return out_dir


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    check_not_input(out_dir, "--out", keep=[("the current directory", Path.cwd())])
    check_writable_dir(out_dir.parent, "--out", create=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"--out: {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HarnessError(f"--out: {out_dir} exists and is not empty; pass --overwrite or choose another path")


# --------------------------------------------------------------------------- reading back


def demo_info(model_dir) -> dict:
    """The `tokenwise_demo` record of a demo model dir (empty dict for any other model)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"--model_dir: cannot read {path}: {exc}") from None
    return config.get("tokenwise_demo") or {}


def planted_outliers(model_dir) -> dict[str, list[int]]:
    """Module path -> input channels made large on purpose (empty for non-demo models)."""
    return {k: list(v) for k, v in demo_info(model_dir).get("outliers", {}).items()}
