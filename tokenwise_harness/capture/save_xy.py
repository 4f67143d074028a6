"""save_xy: run representative data through the model once and cache every allowlisted
projection's input X and output Y (seed §1).

Forward hooks on exactly the allowlisted nn.Linear modules hand each batch's activations to
the streaming cache writer, which puts them at their final offset on disk at once: the peak
is one batch of one module's activations plus the model, never the whole cache.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tokenwise_harness import __version__
from tokenwise_harness.allowlist import iter_allowed_linears
from tokenwise_harness.atomic import (
    atomic_path,
    check_not_input,
    check_output_file,
    check_writable_dir,
    clear_leftovers,
)
from tokenwise_harness.cache import FORMAT_VERSION, StreamingSafetensorsWriter, have_safetensors
from tokenwise_harness.checkpoint import ModelDir, load_model, load_tokenizer, resolve_torch_dtype
from tokenwise_harness.device import pick_device
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.text import plural

SAVE_DTYPES = ("fp16", "fp32", "bf16")


def validate_label(label: str) -> str:
    if not label or "/" in label or "\\" in label or label in (".", "..") or label.startswith("."):
        raise HarnessError(f"--label {label!r} must be a plain file name (no path separators, not hidden)")
    return label


def validate_counts(cn: int, eu: int, length: int) -> None:
    if length <= 0:
        raise HarnessError(f"--length {length} must be a positive token count")
    if cn < 0 or eu < 0 or cn + eu == 0:
        raise HarnessError(f"--cn {cn} / --eu {eu}: sample counts must be >= 0 and not both 0")


def cache_path(save_path: Path, label: str) -> Path:
    return Path(save_path) / (label + (".safetensors" if have_safetensors() else ".pt"))


def save_xy(model_dir, save_path, label, seed=0, cn=50, eu=80, length=128, torch_dtype="auto",
            device_map=None, save_dtype="fp16", use_cache=False, batch_size=8, device=None,
            corpus=None, data_fn=None, trust_remote_code=False, compact=False, progress=True, log=print,
            cache_root=None) -> Path:
    """Capture the cache; return its path. All flags are validated before the model loads.
    cache_root: where the model's weight-digest memo lives (checkpoint.ModelDir; None: the default root)."""
    import torch

    from tokenwise_harness.capture import data

    validate_label(label)
    validate_counts(cn, eu, length)
    if save_dtype not in SAVE_DTYPES:
        raise HarnessError(f"--save_dtype {save_dtype!r} is unknown; use fp16 or fp32")
    resolve_torch_dtype(torch_dtype)
    if batch_size <= 0:
        raise HarnessError(f"--batch_size {batch_size} must be positive")
    mdir = ModelDir(model_dir, cache_root=cache_root)
    final = cache_path(Path(save_path), label)
    check_not_input(final, "--save_path/--label", inputs=[("--model_dir", mdir.path)])
    final = check_output_file(cache_path(check_writable_dir(Path(save_path), "--save_path"), label),
                              "--save_path/--label")
    if clear_leftovers(final):
        log("save_xy: removed temp files of an interrupted earlier run; starting clean")

    device = pick_device(device) if device_map is None else None
    # Data first: a bad --cn/--eu/--length fails before the (possibly huge) model loads.
    tokenizer = load_tokenizer(mdir, trust_remote_code)
    get_data = data_fn or data.get_veri_data
    batch = get_data(tokenizer, seed, cn, length, eu, length, "cpu", **({"corpus": corpus} if corpus else {}))
    model = load_model(mdir, torch_dtype, device_map, trust_remote_code)
    if device is not None:
        model.to(device)
    in_device = model.get_input_embeddings().weight.device
    targets = list(iter_allowed_linears(model))
    if not targets:
        raise HarnessError(f"--model_dir {mdir.path}: no allowlisted linear (model.layers.N.self_attn|mlp.*_proj)")
    for target, mod in targets:  # NaN weights would otherwise surface as "NaN activations"
        if not torch.isfinite(mod.weight).all():
            raise HarnessError(f"--model_dir {mdir.path}: {target.path}.weight holds NaN/Inf values; fix the checkpoint")
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    n_tokens = input_ids.numel()
    meta = {
        "seed": str(seed), "cn": str(cn), "eu": str(eu), "length": str(length), "save_dtype": save_dtype,
        "format_version": FORMAT_VERSION, "model_fingerprint": mdir.fingerprint,
        "data_fingerprint": data.data_fingerprint(batch), "n_tokens": str(n_tokens),
        "model_name": mdir.name, "torch_dtype": str(torch_dtype), "harness_version": __version__,
    }
    shapes, aliases = _cache_layout(targets, n_tokens, compact)
    if aliases:
        meta["x_aliases"] = json.dumps(aliases, sort_keys=True)
    store_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[save_dtype]

    started = time.perf_counter()
    with atomic_path(final, "--save_path") as tmp:
        sink = _make_sink(tmp, shapes, save_dtype, meta)
        try:
            with _hooks(targets, sink, store_dtype, aliases):
                _run_batches(model, input_ids, mask, batch_size, in_device, use_cache, progress)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
    log(f"save_xy: {plural(len(targets), 'projection')} x {plural(n_tokens, 'token')} -> {final} "
        f"({final.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s)")
    return final


def _run_batches(model, input_ids, mask, batch_size, device, use_cache, progress) -> None:
    import torch
    from tqdm import tqdm

    # progress: False, True (stderr) or a text stream to draw on; the bar counts tokens (rate, ETA).
    stream = None if isinstance(progress, bool) else progress
    with torch.inference_mode(), tqdm(total=input_ids.numel(), desc="save_xy", unit="tok", unit_scale=True,
                                      file=stream, disable=not progress) as bar:
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size]
            model(input_ids=ids.to(device), attention_mask=mask[s:s + batch_size].to(device), use_cache=use_cache)
            bar.update(ids.numel())


def _cache_layout(targets, n_tokens: int, compact: bool) -> tuple[dict, dict]:
    """Tensor shapes to write, and (compact only) the `.X` keys stored under a sibling's key."""
    shapes, aliases, first_of_group = {}, {}, {}
    for target, mod in targets:
        x_key = target.path + ".X"
        leader = first_of_group.setdefault(target.input_group, x_key)
        if compact and leader != x_key:
            aliases[x_key] = leader
        else:
            shapes[x_key] = (n_tokens, mod.in_features)
        if not compact:
            shapes[target.path + ".Y"] = (n_tokens, mod.out_features)
    return shapes, aliases


@contextlib.contextmanager
def _hooks(targets, sink, store_dtype, aliases):
    """Forward hooks streaming each allowlisted module's X and Y into the sink.

    An aliased X (compact layout) is not written again; the hook checks that it really is
    the very tensor its sibling read, so a model whose siblings read different inputs
    cannot silently produce a wrong compact cache.
    """
    import torch

    seen_inputs: dict[str, tuple] = {}

    def make_hook(path):
        def hook(mod, inputs, output):
            x_key = path + ".X"
            stored = aliases.get(x_key)
            identity = (inputs[0].data_ptr(), tuple(inputs[0].shape))
            if stored is not None:
                if seen_inputs.get(stored) != identity:
                    raise HarnessError(f"{path} does not read the same input as {stored[:-2]}; "
                                       "capture without --compact")
            else:
                seen_inputs[x_key] = identity
            x = inputs[0].reshape(-1, mod.in_features).to(store_dtype).cpu()
            pairs = [] if stored is not None else [(x_key, x)]
            if path + ".Y" in sink.names:
                pairs.append((path + ".Y", output.reshape(-1, mod.out_features).to(store_dtype).cpu()))
            for name, t in pairs:
                if not torch.isfinite(t).all():
                    raise HarnessError(f"{name}: activations are NaN/Inf after casting to the save dtype; "
                                       "use --save_dtype fp32 or check the model weights")
                sink.write_rows(name, t)
        return hook

    handles = [mod.register_forward_hook(make_hook(t.path)) for t, mod in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _PtSink:
    """The `.pt` fallback when safetensors is missing: rows gathered in RAM, torch.save at the end."""

    def __init__(self, path, shapes, meta):
        self.path, self.meta = path, meta
        self.parts = {name: [] for name in shapes}
        self.names = set(shapes)

    def write_rows(self, name, rows):
        self.parts[name].append(rows.clone())

    def finish(self):
        import torch

        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        torch.save({"__metadata__": self.meta, **tensors}, self.path)

    def abort(self):
        self.parts.clear()


def _make_sink(tmp: Path, shapes, save_dtype, meta):
    if have_safetensors():
        return StreamingSafetensorsWriter(tmp, shapes, save_dtype, meta)
    return _PtSink(tmp, shapes, meta)
