"""SmoothQuant: per-channel factors from a cache, smoothed model dirs, and loading them.

Formula (per input channel j of a projection's input, shared by the projections that read
the same input: q/k/v, gate/up; o and down alone):

    s_j = max_t |X_tj|^alpha / max_i |W_ij|^(1 - alpha)     clamped to [1e-5, 1e5]

where the max over i runs over the rows of every projection sharing the input. Which side is
which: the smoothed weight is W'_ij = W_ij * s_j (multiplied, stored in the smoothed model's
weights) and the activation is divided, X'_tj = X_tj / s_j, so X' W'ᵀ = X Wᵀ exactly in
real arithmetic. A smoothed model dir stores W' in its shards plus each allowlisted linear's
`smooth_factor` tensor s; `load_smoothed_model` registers s as a buffer and divides the
linear's input by it in a forward pre-hook, so the loaded model computes the original
function. eval_smooth divides the cached X by s and scores X' W~'ᵀ against Y (seed §3).

`--alpha search` (SVDQuant's shipped recipe, calibrate.py) searches the exponents per layer and
input group instead: s = max|X|^a / max|W|^b over a in 0.05..0.95, b in {1 - a, 0}, plus
s = 1, keeping the candidate whose group output error on the cache -- with the low-rank
branch and the quantized residual of `--search_rank` (32) / `--search_qspec` (nvfp4@16) in
place -- is lowest. tokenwise_smooth.json then records `alpha: "search"` and, per group,
`alphas[group] = {a, b, error, baseline_error (s = 1), fixed_error (a = b = 0.5), signal}`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenwise_harness.allowlist import Target
from tokenwise_harness.atomic import atomic_dir, check_not_input, check_writable_dir, clear_leftovers
from tokenwise_harness.cache import XYCache
from tokenwise_harness.checkpoint import SMOOTH_META_FILE, ModelDir, load_model
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.numerics.smoothing import ALPHA_GRID, smooth_factor
from tokenwise_harness.text import plural

if TYPE_CHECKING:
    import torch

FORMULA = "s_j = max|X_j|^alpha / max|W_j|^(1-alpha); W' = W*s (input dim), X' = X/s"
FORMULA_SEARCH = ("s_j = max|X_j|^a / max|W_j|^b, (a, b) per input group minimising the output error of "
                  "{key} on the cache over a in 0.05..0.95, b in {{1-a, 0}}, and s = 1 (a = b = 0); "
                  "W' = W*s (input dim), X' = X/s")


def activation_absmax(cache: XYCache, target: Target, chunk_tokens: int = 4096) -> torch.Tensor:
    """max_t |X_tj| of one projection's cached input, streamed in chunks."""
    import torch

    entry = cache.entry(target)
    amax = torch.zeros(entry.in_dim, dtype=torch.float32)
    for start in range(0, cache.n_tokens, chunk_tokens):
        x = cache.rows(entry.x_key, start, min(start + chunk_tokens, cache.n_tokens)).float()
        if not torch.isfinite(x).all():
            cache.verify_tensor(entry.x_key)  # a flipped bit can make a NaN: report corruption as such
            raise HarnessError(f"--xy_path {cache.path}: {entry.x_key} holds NaN/Inf activations")
        amax = torch.maximum(amax, x.abs().amax(dim=0))
    return amax




def compute_factors(mdir: ModelDir, cache: XYCache, alpha: float, chunk_tokens: int = 4096) -> dict:
    """{target: s} for every allowlisted projection; siblings sharing an input share s."""
    import torch

    groups: dict[str, list[Target]] = {}
    for target in mdir.targets():
        groups.setdefault(target.input_group, []).append(target)
    factors = {}
    for members in groups.values():
        act = activation_absmax(cache, members[0], chunk_tokens)
        w_amax = torch.stack([mdir.read(t.path + ".weight").float().abs().amax(dim=0) for t in members]).amax(0)
        if w_amax.shape != act.shape:
            raise HarnessError(f"--xy_path {cache.path}: {members[0].path}.X has {act.shape[0]} channels but the "
                               f"weight has {w_amax.shape[0]}; the cache is from another model")
        s = smooth_factor(act, w_amax, alpha)
        for t in members:
            factors[t] = s
    return factors


def write_smoothed_model(mdir: ModelDir, out_dir: Path, factors: dict, meta: dict) -> Path:
    """Rewrite the shards with W*s and smooth_factor tensors; copy everything else. Atomic."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HarnessError(f"--out_dir {out_dir} exists and is not empty; pick a new directory")
    if mdir.safetensors_index is None:
        raise HarnessError(f"--model_dir {mdir.path}: smoothing needs safetensors weights")
    with atomic_dir(out_dir, "--out_dir") as tmp:
        by_weight = {t.path + ".weight": (t, s) for t, s in factors.items()}
        new_keys: dict[str, str] = {}
        loaded = set(mdir.weight_files)  # stray *.safetensors beside them are copied as they are
        for f in mdir.path.iterdir():
            if f in loaded and f.suffix == ".safetensors":
                tensors = load_file(str(f))
                for name in list(tensors):
                    if name in by_weight:
                        t, s = by_weight[name]
                        w = tensors[name]
                        tensors[name] = (w.float() * s).to(w.dtype)
                        tensors[t.path + ".smooth_factor"] = s.clone()
                        new_keys[t.path + ".smooth_factor"] = f.name
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            elif f.is_file():
                shutil.copy2(f, tmp / f.name)
        _extend_index(tmp, new_keys)
        (tmp / SMOOTH_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def _extend_index(directory: Path, new_keys: dict[str, str]) -> None:
    index_file = directory / "model.safetensors.index.json"
    if not index_file.is_file():
        return
    index = json.loads(index_file.read_text())
    index.setdefault("weight_map", {}).update(new_keys)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def parse_alpha(alpha: float | str, flag: str = "--alpha") -> float | str:
    """--alpha: a float in [0, 1], or 'search' (the exponent searched per layer and input group)."""
    if isinstance(alpha, str) and alpha.strip().lower() == "search":
        return "search"
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise HarnessError(f"{flag} {alpha!r} must be a number in [0, 1] or 'search'") from None
    if not (0.0 <= value <= 1.0):
        raise HarnessError(f"{flag} {alpha} must lie in [0, 1] (or be 'search')")
    return value


def smooth(model_dir: str | Path, xy_path: str | Path, out_dir: str | Path, alpha: float | str = 0.5,
           chunk_tokens: int = 4096, log: Callable[[str], None] = print,
           search_qspec: str | None = None, search_rank: int | None = None, device: str | None = None,
           cache_root: str | Path | None = None) -> Path:
    """The `smooth` subcommand (cache_root: where the model's weight-digest memo lives, as in
    checkpoint.ModelDir; None: the default root).

    alpha = 'search' runs calibrate.search_factors: per layer and input group, the exponents
    (a, b) of s = max|X|^a / max|W|^b with the lowest output error on the cache, scored with
    the rank-`search_rank` branch and the `search_qspec` residual in place (defaults
    calibrate.SEARCH_RANK = 32, calibrate.SEARCH_QSPEC = nvfp4@16); on `device` (default cuda
    when present). The chosen exponents go to tokenwise_smooth.json under `alphas`.
    """
    from tokenwise_harness.calib import search as calibrate

    alpha = parse_alpha(alpha)
    if chunk_tokens <= 0:
        raise HarnessError(f"--chunk_tokens {chunk_tokens} must be a positive token count")
    out_dir = Path(out_dir)
    check_not_input(out_dir, "--out_dir", inputs=[("--model_dir", model_dir), ("--xy_path", xy_path)])
    check_writable_dir(out_dir.parent, "--out_dir")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HarnessError(f"--out_dir {out_dir} exists and is not an empty directory; pick a new directory")
    if clear_leftovers(out_dir):
        log("smooth: removed temp files of an interrupted earlier run; starting clean")
    mdir = ModelDir(model_dir, cache_root=cache_root)
    cache = XYCache(xy_path)
    hint = f"tokenwise-precision save_xy --model_dir {mdir.path} --save_path {cache.path.parent} --label {cache.path.stem}"
    cache.check_model(mdir.fingerprint, "--model_dir", hint)
    meta = {"alpha": alpha, "formula": FORMULA, "source_model_fingerprint": mdir.fingerprint,
            "xy_path": str(xy_path), "xy_data_fingerprint": cache.metadata.get("data_fingerprint", "")}
    if alpha == "search":
        from tokenwise_harness.device import pick_device
        from tokenwise_harness.grid import SvdqConfig, parse_qspec

        qspec = parse_qspec(search_qspec or calibrate.SEARCH_QSPEC, "--search_qspec")
        rank = calibrate.SEARCH_RANK if search_rank is None else int(search_rank)
        if rank < 0:
            raise HarnessError(f"--search_rank {rank} must be >= 0")
        cfg = SvdqConfig(rank, qspec.fmt, qspec.blk)
        factors, alphas = calibrate.search_factors(mdir, cache, cfg, chunk_tokens, pick_device(device),
                                                   log=None)
        meta.update(formula=FORMULA_SEARCH.format(key=cfg.key), alphas=alphas,
                    search={"qspec": qspec.text, "rank": rank, "alpha_grid": list(ALPHA_GRID),
                            "objective": "sum over the group's projections of tr(dW' H_s dW'^T)"})
    else:
        factors = compute_factors(mdir, cache, alpha, chunk_tokens)
    out = write_smoothed_model(mdir, out_dir, factors, meta)
    log(f"smooth: {plural(len(factors), 'projection')} smoothed (alpha={alpha}) -> {out}")
    return out


def load_smoothed_model(model_dir: str | Path, torch_dtype: str | None = "auto",
                        device_map: str | None = None) -> torch.nn.Module:
    """The seed's interface: load a smoothed model with `smooth_factor` buffers on its linears.

    The buffers come from the shards; a forward pre-hook divides each smoothed linear's input
    by its factor, so the model computes the original function.
    """
    mdir = ModelDir(model_dir, "--smooth_model_dir")
    return attach_smooth_factors(load_model(mdir, torch_dtype, device_map), mdir)


def attach_smooth_factors(model: torch.nn.Module, mdir: ModelDir) -> torch.nn.Module:
    """Give every allowlisted linear of `model` its `smooth_factor` buffer from the shards and the
    pre-hook dividing its input by it (a model holding only some layers: theirs)."""
    from tokenwise_harness.allowlist import iter_allowed_linears

    for target, mod in iter_allowed_linears(model):
        s = mdir.read(target.path + ".smooth_factor")
        if s is None:
            continue
        _set_or_register_buffer(mod, "smooth_factor", s.to(mod.weight.device))
        mod.register_forward_pre_hook(_divide_input)
    return model


def _set_or_register_buffer(mod, name, tensor) -> None:
    if name in mod._buffers:
        mod._buffers[name] = tensor
    else:
        mod.register_buffer(name, tensor)


def _divide_input(mod, args):
    x = args[0]
    return (x / mod.smooth_factor.to(x.dtype),) + tuple(args[1:])
