"""Reliability: the bad-input matrix over every entry point, integrity, determinism, security.

The matrix is the one place that lists every entry point x bad input, one test id per case:

- CLI (`save_xy`, `eval_fake`, `eval_smooth`, `smooth`, `analyze`): exit 2, exactly one line
  on stderr that names the flag or file and says what to do, no traceback, and nothing left
  in the output location (no file under a final name, no `.tmp-*`). `--debug` re-raises.
- pytest options, thresholds.yaml and baselines (an inner pytest run via pytester): a usage
  error exits 4 with one `ERROR: tokenwise: ...` line naming the option or file, never an
  INTERNALERROR; bad input that is only seen while a case runs (a baseline file, a corrupted
  tensor) fails that case with its one-line message, no traceback.

Bad inputs already covered one level down are not repeated here: thresholds.yaml's full
validation (tests/test_thresholds.py), baseline files (tests/test_baselines.py), report files
(tests/test_report.py), save_xy flag values (tests/test_capture.py) and the eval_fake flag
values and broken caches of tests/test_engine.py::test_eval_bad_inputs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import files_under, one_line_error, run_cli
from tokenwise_harness.calib.smooth import smooth
from tokenwise_harness.capture.save_xy import save_xy

pytest_plugins = ("pytester",)

QUIET = dict(progress=False, log=lambda msg: None)
HAS_CUDA = torch.cuda.is_available()
Q_X = "model.layers.0.self_attn.q_proj.X"
DOWN_X = "model.layers.1.mlp.down_proj.X"
UP_Y = "model.layers.0.mlp.up_proj.Y"


# ---------------------------------------------------------------- shared inputs


@dataclass
class World:
    model: Path  # the 2-layer qwen3 demo model
    other_model: Path  # same shapes, other weights (seed 1)
    cache: Path  # fp16 cache of `model`, 64 tokens, with checksums
    other_cache: Path  # cache of `other_model`
    other_data_cache: Path  # cache of `model` from other samples (seed 1)
    smoothed: Path  # `model` smoothed with `cache`
    report: Path  # an eval_fake report of `model`


@pytest.fixture(scope="module")
def world(demo_model_dir, tmp_path_factory) -> World:
    from tokenwise_harness.demo.models import make_demo_model
    from tokenwise_harness.report import document as report
    from tokenwise_harness.run import EvalSpec, run_eval

    root = tmp_path_factory.mktemp("reliability")
    small = dict(cn=2, eu=2, length=16, **QUIET)
    other_model = make_demo_model("qwen3", root / "other_model", seed=1)
    cache = save_xy(demo_model_dir, root / "cache", "c", **small)
    spec = EvalSpec.from_text("8", "nvfp4@16", model_dir=str(demo_model_dir), xy_path=str(cache))
    return World(
        model=demo_model_dir,
        other_model=other_model,
        cache=cache,
        other_cache=save_xy(other_model, root / "cache", "other", **small),
        other_data_cache=save_xy(demo_model_dir, root / "cache", "seed1", seed=1, **small),
        smoothed=smooth(demo_model_dir, cache, root / "smoothed", log=lambda m: None),
        report=report.write_report(run_eval(spec, **QUIET), root / "report.json"),
    )


# ---------------------------------------------------------------- builders of bad inputs


def st_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        return hlen, json.loads(fh.read(hlen))


def copy(src: Path, t: Path, name: str | None = None) -> Path:
    dst = t / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def truncated(w: World, t: Path, keep: Callable[[int, int], int]) -> Path:
    """The cache cut to keep(header_len, size) bytes."""
    path = copy(w.cache, t, "cut.safetensors")
    hlen, _ = st_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(keep(hlen, path.stat().st_size))
    return path


def flipped(w: World, t: Path, key: str, element: int, value: bytes | None = None) -> Path:
    """The cache with one fp16 element of `key` changed: low mantissa bit flipped, or set to `value`."""
    path = copy(w.cache, t, "flip.safetensors")
    hlen, header = st_header(path)
    at = 8 + hlen + header[key]["data_offsets"][0] + 2 * element
    with open(path, "r+b") as fh:
        fh.seek(at)
        old = fh.read(2)
        fh.seek(at)
        fh.write(value if value is not None else bytes([old[0] ^ 1, old[1]]))
    return path


def resaved(w: World, t: Path, change: Callable[[dict, dict], None], src: Path | None = None) -> Path:
    """The cache re-written after change(tensors, metadata); checksums dropped unless change keeps them."""
    with safe_open(str(src or w.cache), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != "checksums"}
    change(tensors, meta)
    path = t / "resaved.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def set_value(key: str, value: float):
    def change(tensors, meta):
        tensors[key] = tensors[key].clone()
        tensors[key][1, 2] = value
    return change


def narrower(key: str):
    """Drop the last column of `key` (a cache from a model of another width), and the fingerprint."""
    def change(tensors, meta):
        tensors[key] = tensors[key][:, :-1].contiguous()
        meta.pop("model_fingerprint")
    return change


def model_copy(src: Path, t: Path, change: Callable[[Path], None], name: str = "model") -> Path:
    path = copy(src, t, name)
    change(path)
    return path


def nan_weight(key: str):
    def change(model: Path):
        weights = load_file(str(model / "model.safetensors"))
        weights[key] = weights[key].clone()
        weights[key][0, 0] = float("nan")
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return change


def smoothed_with(change_weights: Callable[[dict], None] | None = None, meta_text: str | None = None):
    def change(model: Path):
        if change_weights is not None:
            weights = load_file(str(model / "model.safetensors"))
            change_weights(weights)
            save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
        if meta_text is not None:
            (model / "tokenwise_smooth.json").write_text(meta_text)
    return change


def zero_factor(weights: dict) -> None:
    key = "model.layers.0.self_attn.q_proj.smooth_factor"
    weights[key] = weights[key].clone()
    weights[key][3] = 0.0


def a_file(t: Path) -> Path:
    (t / "plain_file").write_text("not a directory")
    return t / "plain_file"


def rm(name: str):
    return lambda model: (model / name).unlink()


def cut_shard(name: str, drop: int):
    def change(model: Path):
        with open(model / name, "r+b") as fh:
            fh.truncate((model / name).stat().st_size - drop)
    return change


def write(name: str, text: str):
    return lambda model: (model / name).write_text(text)


def bad_pickle(t: Path) -> Path:
    """A .pt 'cache' whose unpickling would run code; weights_only=True must refuse it."""
    marker = t / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = t / "evil.pt"
    path.write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj.X": Evil()}, protocol=2))
    return path


def symlink(name: str, target: Callable[[World, Path], Path]):
    """A path `name` in the tmp dir that is a symlink to target(w, t)."""
    def make(w, t):
        (t / name).symlink_to(target(w, t))
        return t / name
    return make


def hardlink(name: str, target: Callable[[World, Path], Path]):
    """A path `name` in the tmp dir that is a hard link to target(w, t)."""
    def make(w, t):
        os.link(target(w, t), t / name)
        return t / name
    return make


def model_in_t(w: World, t: Path, name: str = "model") -> Path:
    """A copy of the model in the tmp dir (made once per case)."""
    return t / name if (t / name).is_dir() else copy(w.model, t, name)


def cache_in_t(w: World, t: Path) -> Path:
    return t / w.cache.name if (t / w.cache.name).is_file() else copy(w.cache, t)


def zero_tokens(tensors, meta):
    for k in list(tensors):
        tensors[k] = tensors[k][:0].contiguous()


def pt_cache(meta_value, rows: int | None = None):
    """The cache as a .pt file with this __metadata__ (and only the first `rows` tokens)."""
    def make(w, t):
        with safe_open(str(w.cache), "pt") as f:
            tensors = {k: f.get_tensor(k)[:rows].clone() for k in f.keys()}
        torch.save({"__metadata__": meta_value, **tensors}, t / "c.pt")
        return t / "c.pt"
    return make


def header_edit(change: Callable[[dict], None]):
    """The cache with its raw safetensors header edited (data bytes unchanged)."""
    def make(w, t):
        raw = w.cache.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + hlen])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = t / "edited.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + hlen:])
        return path
    return make


def one_d_weight(model: Path) -> None:
    weights = load_file(str(model / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = weights[key].reshape(-1).contiguous()
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})


def gguf_file(cut: int | None = None, garbage: bool = False):
    def make(w, t):
        from tokenwise_harness.gguf_import import packaged_gguf

        data = b"GGUF" + bytes(range(256)) * 8 if garbage else packaged_gguf().read_bytes()[:cut]
        (t / "m.gguf").write_bytes(data)
        return t / "m.gguf"
    return make


# ---------------------------------------------------------------- CLI matrix

FLAG = object()  # a boolean flag (no value); a value of None drops the flag


def flatten(args: dict) -> list:
    out = []
    for key, value in args.items():
        if value is not None:
            out += [key] if value is FLAG else [key, value]
    return out


@dataclass
class Cli:
    id: str
    argv: Callable[[World, Path], list]  # (world, tmp dir) -> arguments after the subcommand
    expect: tuple[str, ...]  # substrings of the error line (the flag or file, and the fix)
    cuda: bool = False  # the case needs a machine without CUDA
    cwd: str | None = None  # run in this directory under the test's tmp dir (created)
    needs: str | None = None  # "gguf": the gguf package; "smollm2": also the packaged SmolLM2 GGUF file


def save_xy_args(model=None, **over):
    def argv(w, t):
        args = {"--model_dir": model(w, t) if model else w.model, "--save_path": t / "out", "--label": "c",
                "--cn": 2, "--eu": 2, "--length": 8}
        args.update({k: v(w, t) if callable(v) and v is not FLAG else v for k, v in over.items()})
        return ["save_xy"] + flatten(args)
    return argv


def eval_args(cmd="eval_fake", model=None, cache=None, **over):
    def argv(w, t):
        flag = "--smooth_model_dir" if cmd == "eval_smooth" else "--model_dir"
        default_model = w.smoothed if cmd == "eval_smooth" else w.model
        args = {flag: model(w, t) if model else default_model, "--xy_path": cache(w, t) if cache else w.cache,
                "--out_json": t / "out" / "r.json", "--ranks": "8", "--qspecs": "nvfp4@16"}
        args.update({k: v(w, t) if callable(v) and v is not FLAG else v for k, v in over.items()})
        return [cmd] + flatten(args)
    return argv


def smooth_args(model=None, cache=None, **over):
    def argv(w, t):
        args = {"--model_dir": model(w, t) if model else w.model, "--xy_path": cache(w, t) if cache else w.cache,
                "--out_dir": t / "out" / "s"}
        args.update({k: v(w, t) if callable(v) and v is not FLAG else v for k, v in over.items()})
        return ["smooth"] + flatten(args)
    return argv


def demo_model_args(out, *extra):
    def argv(w, t):
        return ["make-demo-model", "--out", out(w, t) if callable(out) else out, *extra]
    return argv


def gguf_args(gguf, out=None, *extra):
    def argv(w, t):
        return ["import-gguf", "--gguf", gguf(w, t), "--out", out(w, t) if out else t / "out" / "g", *extra]
    return argv


def analyze_args(report=None, out=None):
    def argv(w, t):
        return ["analyze", "--report", report(w, t) if report else w.report,
                "--out_dir", out(w, t) if out else t / "out" / "a"]
    return argv


def bytes_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def text_file(name: str, text: str):
    def make(w, t):
        (t / name).write_text(text)
        return t / name
    return make


CLI_CASES = [
    # save_xy: the model dir and the output location (flag values: tests/test_capture.py)
    Cli("save_xy-model-no-config", save_xy_args(lambda w, t: model_copy(w.model, t, rm("config.json"))),
        ("--model_dir", "has no config.json")),
    Cli("save_xy-model-no-weights", save_xy_args(lambda w, t: model_copy(w.model, t, rm("model.safetensors"))),
        ("--model_dir", "has no weight files")),
    Cli("save_xy-model-corrupt-weights",
        save_xy_args(lambda w, t: model_copy(w.model, t, write("model.safetensors", "garbage" * 100))),
        ("--model_dir", "model.safetensors")),
    Cli("save_xy-model-config-not-json", save_xy_args(lambda w, t: model_copy(w.model, t, write("config.json", "{"))),
        ("--model_dir", "config.json")),
    Cli("save_xy-weights-nan",
        save_xy_args(lambda w, t: model_copy(w.model, t, nan_weight("model.layers.1.mlp.up_proj.weight"))),
        ("model.layers.1.mlp.up_proj.weight holds NaN/Inf", "fix the checkpoint")),
    Cli("save_xy-device-cuda", save_xy_args(**{"--device": "cuda"}), ("--device cuda", "use --device cpu"), cuda=True),
    Cli("save_xy-device-unknown", save_xy_args(**{"--device": "tpu"}), ("--device 'tpu'", "cpu, cuda or cuda:N")),
    Cli("save_xy-save-path-under-file", save_xy_args(**{"--save_path": lambda w, t: a_file(t) / "cache"}),
        ("--save_path", "cannot create directory")),
    Cli("save_xy-save-path-read-only", save_xy_args(**{"--save_path": "/sys"}), ("--save_path", "/sys is not writable")),
    Cli("save_xy-label-is-a-directory",
        save_xy_args(**{"--label": lambda w, t: (t / "out" / "c.safetensors").mkdir(parents=True) or "c"}),
        ("--label", "is a directory")),
    Cli("save_xy-cn-not-an-integer", save_xy_args(**{"--cn": "many"}), ("--cn", "'many' is not an integer")),
    Cli("save_xy-label-missing", save_xy_args(**{"--label": None}), ("--label", "required")),
    # eval_fake: every way a cache file can be broken
    Cli("eval_fake-cache-missing", eval_args(cache=lambda w, t: t / "nope.safetensors"),
        ("--xy_path", "does not exist", "save_xy")),
    Cli("eval_fake-cache-empty", eval_args(cache=text_file("empty.safetensors", "")),
        ("--xy_path", "not a readable safetensors file", "save_xy")),
    Cli("eval_fake-cache-header-cut-short", eval_args(cache=lambda w, t: truncated(w, t, lambda h, n: 8 + h // 2)),
        ("--xy_path", "not a readable safetensors file", "save_xy")),
    Cli("eval_fake-cache-data-truncated", eval_args(cache=lambda w, t: truncated(w, t, lambda h, n: n - 1000)),
        ("--xy_path", "is truncated", "save_xy")),
    Cli("eval_fake-cache-header-not-an-object",
        eval_args(cache=lambda w, t: bytes_file(t / "arr.safetensors", struct.pack("<Q", 6) + b"[1, 2]")),
        ("--xy_path", "not a readable safetensors file")),
    Cli("eval_fake-cache-bit-flipped", eval_args(cache=lambda w, t: flipped(w, t, DOWN_X, 700)),
        (f"tensor {DOWN_X} fails its checksum", "re-create it")),
    Cli("eval_fake-cache-bit-flipped-to-nan", eval_args(cache=lambda w, t: flipped(w, t, Q_X, 5, b"\x00\x7e")),
        (f"tensor {Q_X} fails its checksum", "re-create it")),
    Cli("eval_fake-cache-bit-flipped-verify-up-front",
        eval_args(cache=lambda w, t: flipped(w, t, DOWN_X, 700), **{"--verify_cache": FLAG}),
        (f"tensor {DOWN_X} fails its checksum",)),
    Cli("eval_fake-cache-checksums-malformed",
        eval_args(cache=lambda w, t: resaved(w, t, lambda ts, m: m.update(checksums="{oops"))),
        ("--xy_path", "'checksums' is not a JSON object")),
    Cli("eval_fake-cache-aliases-not-an-object",
        eval_args(cache=lambda w, t: resaved(w, t, lambda ts, m: m.update(x_aliases="[1]"))),
        ("--xy_path", "x_aliases is not a JSON object")),
    Cli("eval_fake-cache-integer-dtype",
        eval_args(cache=lambda w, t: resaved(w, t, lambda ts, m: ts.update({Q_X: ts[Q_X].to(torch.int32)}))),
        (Q_X, "has dtype I32", "not a float type")),
    Cli("eval_fake-cache-rows-disagree",
        eval_args(cache=lambda w, t: resaved(w, t, lambda ts, m: ts.update({Q_X: ts[Q_X][:-3].contiguous()}))),
        ("--xy_path", "disagree on the token count")),
    Cli("eval_fake-cache-inf-in-y", eval_args(cache=lambda w, t: resaved(w, t, set_value(UP_Y, float("inf")))),
        (UP_Y, "NaN/Inf activations")),
    Cli("eval_fake-cache-from-other-model", eval_args(cache=lambda w, t: w.other_cache),
        ("--xy_path", "different model", "save_xy")),
    Cli("eval_fake-cache-pickle-refused", eval_args(cache=lambda w, t: bad_pickle(t)),
        ("--xy_path", "not a readable .pt cache")),
    Cli("eval_fake-weights-nan",
        eval_args(model=lambda w, t: model_copy(w.model, t, nan_weight("model.layers.1.mlp.down_proj.weight")),
                  cache=lambda w, t: resaved(w, t, lambda ts, m: m.pop("model_fingerprint"))),
        ("model.layers.1.mlp.down_proj.weight holds NaN/Inf", "fix the checkpoint")),
    Cli("eval_fake-model-no-weights", eval_args(model=lambda w, t: model_copy(w.model, t, rm("model.safetensors"))),
        ("--model_dir", "has no weight files")),
    Cli("eval_fake-model-corrupt-weights",
        eval_args(model=lambda w, t: model_copy(w.model, t, write("model.safetensors", "garbage" * 100))),
        ("--model_dir", "model.safetensors")),
    Cli("eval_fake-model-shard-truncated",
        eval_args(model=lambda w, t: model_copy(w.model, t, cut_shard("model.safetensors", 1000))),
        ("--model_dir", "model.safetensors is truncated", "copy the whole checkpoint")),
    Cli("eval_fake-out-json-read-only", eval_args(**{"--out_json": "/sys/r.json"}), ("--out_json", "/sys is not writable")),
    Cli("eval_fake-out-json-under-file", eval_args(**{"--out_json": lambda w, t: a_file(t) / "r.json"}),
        ("--out_json", "cannot create directory")),
    Cli("eval_fake-out-json-is-a-directory",
        eval_args(**{"--out_json": lambda w, t: (t / "out" / "r.json").mkdir(parents=True) or t / "out" / "r.json"}),
        ("--out_json", "is a directory")),
    Cli("eval_fake-torch-dtype", eval_args(**{"--torch_dtype": "fp12"}), ("--torch_dtype 'fp12'", "auto, fp16")),
    Cli("eval_fake-qspec-without-format", eval_args(**{"--qspecs": "@16"}), ("--qspecs", "unknown format")),
    Cli("eval_fake-rank-negative", eval_args(**{"--ranks": "-8"}), ("--ranks", "negative")),
    Cli("eval_fake-chunk-tokens-not-an-integer", eval_args(**{"--chunk_tokens": "4k"}),
        ("--chunk_tokens", "'4k' is not an integer")),
    # eval_smooth
    Cli("eval_smooth-cache-from-other-model", eval_args("eval_smooth", cache=lambda w, t: w.other_cache),
        ("--xy_path", "different model")),
    Cli("eval_smooth-smooth-factor-zero",
        eval_args("eval_smooth", model=lambda w, t: model_copy(w.smoothed, t, smoothed_with(zero_factor))),
        ("smooth_factor has non-positive entries", "tokenwise-precision smooth")),
    Cli("eval_smooth-smooth-meta-not-json",
        eval_args("eval_smooth", model=lambda w, t: model_copy(w.smoothed, t, smoothed_with(meta_text="{"))),
        ("--smooth_model_dir", "tokenwise_smooth.json")),
    Cli("eval_smooth-ranks-unparsable", eval_args("eval_smooth", **{"--ranks": "8;16"}), ("--ranks", "'8;16'")),
    Cli("eval_smooth-device-cuda", eval_args("eval_smooth", **{"--device": "cuda"}), ("--device cuda",), cuda=True),
    # smooth
    Cli("smooth-cache-truncated", smooth_args(cache=lambda w, t: truncated(w, t, lambda h, n: n - 10)),
        ("--xy_path", "is truncated")),
    Cli("smooth-cache-bit-flipped", smooth_args(cache=lambda w, t: flipped(w, t, DOWN_X, 3)),
        (f"tensor {DOWN_X} fails its checksum",)),
    Cli("smooth-cache-key-missing",
        smooth_args(cache=lambda w, t: resaved(w, t, lambda ts, m: (ts.pop(DOWN_X), m.pop("model_fingerprint")))),
        ("--xy_path", "model.layers.1.mlp.down_proj.X")),
    Cli("smooth-cache-shape-mismatch", smooth_args(cache=lambda w, t: resaved(w, t, narrower(Q_X))),
        ("--xy_path", f"{Q_X} has 63 channels but the weight has 64", "another model")),
    Cli("smooth-cache-nan", smooth_args(cache=lambda w, t: resaved(w, t, set_value(Q_X, float("nan")))),
        (Q_X, "NaN/Inf")),
    Cli("smooth-out-dir-is-a-file", smooth_args(**{"--out_dir": lambda w, t: a_file(t)}),
        ("--out_dir", "not an empty directory")),
    Cli("smooth-out-dir-read-only", smooth_args(**{"--out_dir": "/sys/smoothed"}), ("--out_dir", "/sys is not writable")),
    Cli("smooth-chunk-tokens-zero", smooth_args(**{"--chunk_tokens": "0"}), ("--chunk_tokens 0", "positive")),
    Cli("smooth-alpha-nan", smooth_args(**{"--alpha": "nan"}), ("--alpha",)),
    # analyze
    Cli("analyze-report-missing", analyze_args(lambda w, t: t / "nope.json"), ("--report", "does not exist")),
    Cli("analyze-report-not-json", analyze_args(text_file("r.json", "{nope")), ("--report", "not valid JSON")),
    Cli("analyze-report-other-schema", analyze_args(text_file("r.json", '{"meta": {}, "by_layer": {}}')),
        ("--report", "does not match the report schema")),
    Cli("analyze-out-dir-read-only", analyze_args(out=lambda w, t: "/sys/analysis"), ("--out_dir", "/sys")),
    Cli("analyze-out-dir-under-file", analyze_args(out=lambda w, t: a_file(t) / "a"),
        ("--out_dir", "cannot create directory")),
    # issue 18 -- data loss: no output over an input (symlinks and hard links included)
    Cli("eval_fake-out-json-is-the-cache",
        eval_args(cache=cache_in_t, **{"--out_json": lambda w, t: cache_in_t(w, t)}),
        ("--out_json", "is the input --xy_path", "pick another path")),
    Cli("eval_fake-out-json-symlink-to-the-cache",
        eval_args(cache=cache_in_t, **{"--out_json": symlink("r.json", cache_in_t)}),
        ("--out_json", "is the input --xy_path")),
    Cli("eval_fake-out-json-hard-link-to-a-weight-file",
        eval_args(model=model_in_t, **{"--out_json": hardlink("r.json", lambda w, t: model_in_t(w, t) /
                                                                                    "model.safetensors")}),
        ("--out_json", "is a hard link to a file of the input --model_dir")),
    Cli("eval_fake-out-json-into-the-model-dir",
        eval_args(model=model_in_t, **{"--out_json": lambda w, t: model_in_t(w, t) / "r.json"}),
        ("--out_json", "lies inside the input --model_dir")),
    Cli("save_xy-label-overwrites-the-weights",
        save_xy_args(model_in_t, **{"--save_path": model_in_t, "--label": "model"}),
        ("--save_path/--label", "model.safetensors lies inside the input --model_dir")),
    Cli("smooth-out-dir-is-the-model", smooth_args(model=model_in_t, **{"--out_dir": model_in_t}),
        ("--out_dir", "is the input --model_dir")),
    Cli("smooth-model-named-like-its-temp-dir",
        smooth_args(model=lambda w, t: model_in_t(w, t, ".tmp-s.999999999.x"), **{"--out_dir": lambda w, t: t / "s"}),
        ("--out_dir", "has the name of one of its temp files")),
    Cli("analyze-out-dir-over-its-report",
        analyze_args(lambda w, t: copy(w.report, (t / "a").mkdir() or t / "a", "ranking1.csv"),
                     lambda w, t: t / "a"),
        ("--out_dir", "ranking1.csv is the input --report")),
    Cli("make-demo-model-out-dot-overwrite", demo_model_args(".", "--overwrite"), ("--out .", "is the current directory"),
        cwd="here"),
    Cli("make-demo-model-out-parent-of-cwd", demo_model_args("..", "--overwrite"),
        ("--out ..", "contains the current directory"), cwd="here"),
    Cli("import-gguf-out-contains-the-gguf", gguf_args(gguf_file(), lambda w, t: t, "--overwrite"),
        ("--out", "contains the input --gguf"), needs="smollm2"),
    # silent wrong answers
    Cli("eval_fake-quantizer-nan", eval_args(**{"--quantizer": "tests.quantizers:nan_fake_op"}),
        ("nmse = nan is not a finite number", "--quantizer")),
    Cli("eval_fake-quantizer-inf", eval_args(**{"--quantizer": "tests.quantizers:inf_fake_op"}),
        ("is not a finite number", "--quantizer")),
    Cli("eval_fake-cache-zero-tokens", eval_args(cache=lambda w, t: resaved(w, t, zero_tokens)),
        ("--xy_path", "holds 0 tokens", "save_xy")),
    Cli("eval_fake-cache-zero-tokens-pt", eval_args(cache=pt_cache({"seed": "0"}, rows=0)),
        ("--xy_path", "holds 0 tokens")),
    Cli("eval_fake-smoothed-model-dir", eval_args(model=lambda w, t: w.smoothed,
                                                  cache=lambda w, t: resaved(w, t, lambda ts, m: m.pop("model_fingerprint"))),
        ("--model_dir", "is a smoothed model dir", "--smooth_model_dir")),
    Cli("eval_smooth-cache-without-fingerprint",
        eval_args("eval_smooth", cache=lambda w, t: resaved(w, t, lambda ts, m: m.pop("model_fingerprint"))),
        ("--xy_path", "has no model_fingerprint", "save_xy")),
    # resource exhaustion: a huge --chunk_tokens / block size is clamped (tests below), never an allocation
    # tracebacks
    Cli("eval_fake-cache-metadata-not-a-mapping", eval_args(cache=pt_cache(["seed", "0"])),
        ("--xy_path", "__metadata__ is a list")),
    Cli("eval_fake-cache-header-dtype-not-a-string", eval_args(cache=header_edit(lambda h: h[Q_X].update(dtype=["F16"]))),
        ("--xy_path", Q_X, "malformed header entry (dtype is not a string)")),
    Cli("eval_fake-cache-header-fp8-dtype", eval_args(cache=header_edit(lambda h: h[Q_X].update(dtype="F8_E4M3"))),
        (Q_X, "has dtype F8_E4M3", "not a float type")),
    Cli("eval_fake-cache-header-shape-not-integers", eval_args(cache=header_edit(lambda h: h[Q_X].update(shape="ab"))),
        ("--xy_path", "shape is not a list of non-negative integers")),
    Cli("eval_fake-cache-header-offsets-do-not-match-shape",
        eval_args(cache=header_edit(lambda h: h[Q_X].update(data_offsets=[h[Q_X]["data_offsets"][0],
                                                                          h[Q_X]["data_offsets"][0] + 10]))),
        ("--xy_path", "10 bytes for a F16 tensor of shape")),
    Cli("eval_fake-cache-aliases-not-names",
        eval_args(cache=header_edit(lambda h: h["__metadata__"].update(
            x_aliases=json.dumps({"model.layers.0.self_attn.k_proj.X": [1]})))),
        ("--xy_path", "x_aliases is not a JSON object")),
    Cli("eval_fake-config-json-is-a-list", eval_args(model=lambda w, t: model_copy(w.model, t, write("config.json", "[1]"))),
        ("--model_dir", "config.json is a JSON list, not an object")),
    Cli("save_xy-config-json-is-a-list", save_xy_args(lambda w, t: model_copy(w.model, t, write("config.json", "[1]"))),
        ("--model_dir", "config.json is a JSON list, not an object")),
    Cli("eval_fake-weight-is-1-d", eval_args(model=lambda w, t: model_copy(w.model, t, one_d_weight)),
        ("--model_dir", "model.layers.0.self_attn.q_proj.weight", "not the 2-D [out, in]")),
    Cli("save_xy-weight-is-1-d", save_xy_args(lambda w, t: model_copy(w.model, t, one_d_weight)),
        ("--model_dir", "not the 2-D [out, in]")),
    Cli("import-gguf-truncated", gguf_args(gguf_file(cut=200_000)), ("--gguf", "is truncated or corrupt", "copy the file"),
        needs="smollm2"),
    Cli("import-gguf-cut-in-the-tensor-data", gguf_args(gguf_file(cut=5_000_000)), ("--gguf", "is truncated or corrupt"),
        needs="smollm2"),
    Cli("import-gguf-garbage", gguf_args(gguf_file(garbage=True)), ("--gguf", "is truncated or corrupt"), needs="gguf"),
]


def leftovers(t: Path) -> list[str]:
    return sorted(str(p.relative_to(t)) for p in t.rglob(".tmp-*"))


def snapshot(t: Path) -> dict[str, str]:
    """sha256 of every file under t (symlinks by their target's name, not followed)."""
    import hashlib

    out = {}
    for p in sorted(t.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(t))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(t))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(world, tmp_path, case, monkeypatch):
    if case.cuda and HAS_CUDA:
        pytest.skip("this machine has CUDA")
    if case.needs:
        pytest.importorskip("gguf")
    if case.needs == "smollm2":
        from tokenwise_harness.errors import HarnessError
        from tokenwise_harness.gguf_import import packaged_gguf

        try:
            packaged_gguf()
        except HarnessError as exc:
            pytest.skip(str(exc))
    if case.cwd:
        (tmp_path / case.cwd).mkdir()
        (tmp_path / case.cwd / "keep.txt").write_text("the user's file")
        monkeypatch.chdir(tmp_path / case.cwd)
    argv = case.argv(world, tmp_path)
    before = snapshot(tmp_path)
    proc = run_cli(*argv)
    line = one_line_error(proc)
    assert line.startswith(f"tokenwise-precision {argv[0]}: error: "), line
    for part in case.expect:
        assert part in line, (part, line)
    out = tmp_path / "out"
    assert not out.exists() or [f for f in files_under(out)] == [], files_under(out)
    assert snapshot(tmp_path) == before  # nothing lost, nothing half-written, no temp file left
    assert not (tmp_path / "pwned").exists()


def test_cli_matrix_covers_every_subcommand():
    commands = {c.id.split("-")[0] for c in CLI_CASES}
    assert commands == {"save_xy", "eval_fake", "eval_smooth", "smooth", "analyze", "make", "import"}


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match="fails its checksum"):
        run_cli("--debug", *eval_args(cache=lambda w, t: flipped(w, t, DOWN_X, 700))(world, tmp_path))


def test_no_verify_cache_skips_the_check(world, tmp_path):
    """The per-tensor check is on by default and costs one hash pass; --no_verify_cache opts out."""
    argv = eval_args(cache=lambda w, t: flipped(w, t, DOWN_X, 700), **{"--no_verify_cache": FLAG})(world, tmp_path)
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert files_under(tmp_path / "out") == ["r.json"]


# ---------------------------------------------------------------- pytest options, thresholds.yaml, baselines


@dataclass
class Pt:
    id: str
    args: Callable[[World, Path], list]  # (world, inner rootdir) -> extra pytest arguments
    expect: tuple[str, ...]
    outcome: str = "usage"  # "usage": exit 4, one ERROR line; "failed": the selected case fails
    cuda: bool = False
    before: Callable | None = None  # (world, pytester) -> None: an earlier inner run


def opts(**over):
    """Harness options (a one-case selection, baselines under the inner rootdir), with overrides."""
    def args(w, t):
        base = {"--model-dir": w.model, "--xy-path": w.cache, "--ranks": "8", "--qspecs": "nvfp4@16",
                "--baselines-dir": t / "baselines"}
        base.update({k: v(w, t) if callable(v) and v is not FLAG else v for k, v in over.items()})
        # --opt=value: a separate path argument would move pytest's rootdir (see tests/test_plugin.py)
        flags = [k if v is FLAG else f"{k}={v}" for k, v in base.items() if v is not None]
        return flags + ["-k", "layer0-self_attn-q_proj"]
    return args


def thresholds(text: str, name: str = "my_thresholds.yaml"):
    def make(w, t):
        (t / name).write_text(text)
        return t / name
    return make


def baseline_file(text: str):
    """A layer0.json for the demo model in the inner run's baselines dir; returns the dir."""
    def make(w, t):
        from tokenwise_harness.checkpoint import ModelDir
        from tokenwise_harness.verdict.baselines import model_id

        mdir = ModelDir(w.model)
        path = t / "baselines" / model_id(mdir.name, mdir.fingerprint) / "layer0.json"
        path.parent.mkdir(parents=True)
        path.write_text(text)
        return t / "baselines"
    return make


PT_CASES = [
    Pt("pytest-model-dir-missing", opts(**{"--model-dir": lambda w, t: t / "nope"}), ("--model-dir", "does not exist")),
    Pt("pytest-model-dir-no-config", opts(**{"--model-dir": lambda w, t: model_copy(w.model, t, rm("config.json"))}),
       ("--model-dir", "has no config.json")),
    Pt("pytest-smooth-model-dir-no-weights",
       opts(**{"--smooth-model-dir": lambda w, t: model_copy(w.smoothed, t, rm("model.safetensors"))}),
       ("--smooth-model-dir", "has no weight files")),
    Pt("pytest-ranks", opts(**{"--ranks": "8,x"}), ("--ranks", "'x' is not an integer rank")),
    Pt("pytest-qspecs", opts(**{"--qspecs": "nvfp5@16"}), ("--qspecs", "unknown format 'nvfp5'")),
    Pt("pytest-grid-mode", opts(**{"--grid-mode": "partial"}), ("--grid-mode", "'partial'")),
    Pt("pytest-chunk-tokens", opts(**{"--chunk-tokens": "0"}), ("--chunk-tokens 0", "positive")),
    Pt("pytest-device-cuda", opts(**{"--device": "cuda"}), ("--device cuda", "use --device cpu"), cuda=True),
    Pt("pytest-device-unknown", opts(**{"--device": "tpu"}), ("--device 'tpu'",)),
    Pt("pytest-torch-dtype", opts(**{"--torch-dtype": "fp12"}), ("--torch-dtype 'fp12'",)),
    Pt("pytest-quantizer", opts(**{"--quantizer": "nosuch.module:fn"}), ("--quantizer", "cannot import")),
    Pt("pytest-xy-path-missing", opts(**{"--xy-path": lambda w, t: t / "nope.safetensors"}),
       ("--xy-path", "does not exist", "save_xy")),
    Pt("pytest-xy-path-truncated", opts(**{"--xy-path": lambda w, t: truncated(w, t, lambda h, n: n - 1000)}),
       ("--xy-path", "is truncated")),
    Pt("pytest-xy-path-other-model", opts(**{"--xy-path": lambda w, t: w.other_cache}),
       ("--xy-path", "different model", "save_xy")),
    Pt("pytest-xy-path-bit-flipped", opts(**{"--xy-path": lambda w, t: flipped(w, t, Q_X, 9)}),
       (f"tensor {Q_X} fails its checksum",), outcome="failed"),
    Pt("pytest-xy-path-nan", opts(**{"--xy-path": lambda w, t: resaved(w, t, set_value(Q_X, float("nan")))}),
       (Q_X, "NaN/Inf activations"), outcome="failed"),
    Pt("pytest-xy-path-shape-mismatch", opts(**{"--xy-path": lambda w, t: resaved(w, t, narrower(Q_X))}),
       ("--xy-path", "X/Y dims (63, 64) do not match the weight (64, 64)", "another model"), outcome="failed"),
    Pt("pytest-weights-nan",
       opts(**{"--model-dir": lambda w, t: model_copy(w.model, t, nan_weight("model.layers.0.self_attn.q_proj.weight")),
               "--xy-path": lambda w, t: resaved(w, t, lambda ts, m: m.pop("model_fingerprint"))}),
       ("model.layers.0.self_attn.q_proj.weight holds NaN/Inf", "fix the checkpoint"), outcome="failed"),
    Pt("pytest-xy-path-other-data", opts(**{"--xy-path": lambda w, t: w.other_data_cache}),
       ("cache_fingerprint differs", "the cached activations"), outcome="failed",
       before=lambda w, pytester: inner_run(pytester, opts(**{"--update-baselines": FLAG})(w, pytester.path))),
    Pt("pytest-report-is-a-directory", opts(**{"--tokenwise-report": lambda w, t: t}),
       ("--tokenwise-report", "is a directory")),
    Pt("pytest-report-read-only", opts(**{"--tokenwise-report": "/sys/r.json"}),
       ("--tokenwise-report", "/sys is not writable")),
    Pt("pytest-capture-no-samples", opts(**{"--xy-path": None, "--xy-cn": "0", "--xy-eu": "0"}),
       ("--xy-cn", "--xy-eu")),
    Pt("thresholds-missing", opts(**{"--thresholds": lambda w, t: t / "nope.yaml"}),
       ("--thresholds", "nope.yaml", "does not exist")),
    Pt("thresholds-bad-yaml", opts(**{"--thresholds": thresholds("defaults: {nmse: [1, 2}\n")}),
       ("my_thresholds.yaml", "not valid YAML", "line 1")),
    Pt("thresholds-unknown-metric", opts(**{"--thresholds": thresholds("defaults: {nmse_db: 1}\n")}),
       ("my_thresholds.yaml", "unknown metric 'nmse_db'")),
    Pt("thresholds-unknown-match-field",
       opts(**{"--thresholds": thresholds("rules: [{match: {module: q}, limits: {nmse: 1}}]\n")}),
       ("my_thresholds.yaml", "unknown field 'module'")),
    Pt("thresholds-negative-limit", opts(**{"--thresholds": thresholds("defaults: {nmse: -0.1}\n")}),
       ("my_thresholds.yaml", "defaults.nmse: -0.1 is negative")),
    Pt("thresholds-grid-qspec", opts(**{"--thresholds": thresholds("grid: {qspecs: [nvfp4@x]}\n")}),
       ("my_thresholds.yaml", "grid.qspecs", "nvfp4@x")),
    Pt("thresholds-default-location", opts(**{"--thresholds": lambda w, t: thresholds(
        "version: 2\n", "thresholds.yaml")(w, t) and None}), ("thresholds.yaml", "version 2 is not supported")),
    Pt("thresholds-python-tag",
       opts(**{"--thresholds": lambda w, t: thresholds(f"defaults: !!python/object/apply:os.system ['touch {t}/pwned']\n")(w, t)}),
       ("my_thresholds.yaml", "not valid YAML")),
    Pt("baselines-not-json", opts(**{"--baselines-dir": baseline_file("{not json")}),
       ("layer0.json", "not valid JSON", "--update-baselines"), outcome="failed"),
    Pt("baselines-other-schema-version",
       opts(**{"--baselines-dir": baseline_file('{"schema_version": 2, "provenance": {}, "cases": {}}')}),
       ("layer0.json", "schema_version 2 is not 1"), outcome="failed"),
    Pt("baselines-dir-under-file", opts(**{"--baselines-dir": lambda w, t: a_file(t) / "baselines",
                                           "--update-baselines": FLAG}),
       ("baselines", "plain_file")),
    # issue 18 -- data loss
    Pt("pytest-report-over-the-cache", opts(**{"--xy-path": cache_in_t, "--tokenwise-report": cache_in_t}),
       ("--tokenwise-report", "is the input --xy-path")),
    Pt("pytest-html-over-the-cache", opts(**{"--xy-path": cache_in_t, "--tokenwise-html": cache_in_t}),
       ("--tokenwise-html", "is the input --xy-path")),
    Pt("pytest-html-is-a-directory", opts(**{"--tokenwise-html": lambda w, t: t}),
       ("--tokenwise-html", "is a directory")),
    Pt("pytest-report-symlink-to-the-cache",
       opts(**{"--xy-path": cache_in_t, "--tokenwise-report": symlink("r.json", cache_in_t)}),
       ("--tokenwise-report", "is the input --xy-path")),
    Pt("pytest-report-over-a-baseline-file",
       opts(**{"--tokenwise-report": lambda w, t: baseline_file("{}")(w, t) and
               next((t / "baselines").rglob("layer0.json"))}),
       ("--tokenwise-report", "lies inside the baseline store --baselines-dir")),
    Pt("pytest-report-over-the-thresholds", opts(**{"--thresholds": thresholds("defaults: {nmse: 1}\n"),
                                                    "--tokenwise-report": lambda w, t: t / "my_thresholds.yaml"}),
       ("--tokenwise-report", "is the input --thresholds")),
    # silent wrong answers
    Pt("pytest-quantizer-nan", opts(**{"--quantizer": "tests.quantizers:nan_fake_op"}),
       ("nmse = nan is not a finite number (always fails",), outcome="failed"),
    Pt("pytest-quantizer-inf", opts(**{"--quantizer": "tests.quantizers:inf_fake_op"}),
       ("is not a finite number (always fails",), outcome="failed"),
    Pt("pytest-smoothed-dir-as-model-dir", opts(**{"--model-dir": lambda w, t: w.smoothed}),
       ("--model-dir", "is a smoothed model dir", "--smooth-model-dir=")),
    Pt("pytest-xy-path-zero-tokens", opts(**{"--xy-path": lambda w, t: resaved(w, t, zero_tokens)}),
       ("--xy-path", "holds 0 tokens")),
    Pt("thresholds-empty-option", opts(**{"--thresholds": ""}), ("--thresholds= is empty",)),
    Pt("thresholds-is-a-directory", opts(**{"--thresholds": lambda w, t: (t / "th").mkdir() or t / "th"}),
       ("--thresholds", "is a directory")),
    Pt("thresholds-dangling-symlink", opts(**{"--thresholds": symlink("th.yaml", lambda w, t: t / "gone.yaml")}),
       ("--thresholds", "is a dangling symlink")),
    Pt("thresholds-default-location-is-a-directory",
       opts(**{"--thresholds": lambda w, t: (t / "thresholds.yaml").mkdir() and None}),
       ("thresholds.yaml at the rootdir", "is a directory")),
    Pt("thresholds-default-location-dangling-symlink",
       opts(**{"--thresholds": lambda w, t: symlink("thresholds.yaml", lambda w, t: t / "gone.yaml")(w, t) and None}),
       ("thresholds.yaml at the rootdir", "is a dangling symlink")),
    # resource exhaustion
    Pt("thresholds-alias-bomb", opts(**{"--thresholds": thresholds(
        "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "grid: {ranks: *i}\n")}),
       ("my_thresholds.yaml", "aliases expand the document to more than")),
    Pt("thresholds-deep-nesting", opts(**{"--thresholds": thresholds("defaults: " + "[" * 5000 + "]" * 5000 + "\n")}),
       ("my_thresholds.yaml", "nesting deeper than")),
    Pt("thresholds-too-large", opts(**{"--thresholds": thresholds("# " + "x" * (2 << 20) + "\n")}),
       ("my_thresholds.yaml", "too large for a thresholds file")),
    # tracebacks
    Pt("thresholds-non-mapping-key", opts(**{"--thresholds": thresholds("defaults:\n  ? [nmse, sse]\n  : 1\n")}),
       ("my_thresholds.yaml", "a key must be a plain value")),
    Pt("pytest-weight-is-1-d", opts(**{"--model-dir": lambda w, t: model_copy(w.model, t, one_d_weight)}),
       ("--model-dir", "not the 2-D [out, in]")),
]


def inner_run(pytester, args):
    """An inner pytest run in this process (torch is already imported), output captured."""
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}", *args)


@pytest.mark.parametrize("case", PT_CASES, ids=[c.id for c in PT_CASES])
def test_pytest_bad_input(world, pytester, case):
    if case.cuda and HAS_CUDA:
        pytest.skip("this machine has CUDA")
    if case.before is not None:
        assert case.before(world, pytester).ret == 0
    result = inner_run(pytester, case.args(world, pytester.path))
    out, err = result.stdout.str(), result.stderr.str()
    assert "INTERNALERROR" not in out + err and "Traceback" not in out + err, out + err
    if case.outcome == "usage":
        lines = [line for line in err.splitlines() if line.strip()]
        assert result.ret == pytest.ExitCode.USAGE_ERROR, (result.ret, out, err)
        assert len(lines) == 1 and lines[0].startswith("ERROR: tokenwise: "), err
        text = lines[0]
    else:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, (result.ret, out, err)
        outcomes = result.parseoutcomes()
        assert outcomes.get("failed") == 1 and "passed" not in outcomes, outcomes
        text = out
    for part in case.expect:
        assert part in text, (part, text)
    assert leftovers(pytester.path) == []
    assert not (pytester.path / "pwned").exists()


# ---------------------------------------------------------------- determinism


def test_two_eval_runs_write_byte_identical_reports(world, tmp_path):
    """Same evaluation twice -> the same bytes (sorted keys, fixed floats, no timestamps).

    xdist vs serial equality of the pytest report artifact: tests/test_plugin.py.
    """
    paths = []
    for name in ("a.json", "b.json"):
        args = eval_args(**{"--out_json": tmp_path / name, "--ranks": "0,8", "--qspecs": "nvfp4@16,int4@in",
                            "--grid_mode": "full", "--chunk_tokens": "24"})(world, tmp_path)
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        paths.append(tmp_path / name)
    a, b = (p.read_bytes() for p in paths)
    assert a == b
    assert b"time" not in a.lower() and b"host" not in a.lower()


# ---------------------------------------------------------------- security

PACKAGE = Path(__file__).resolve().parents[1] / "tokenwise_harness"


def _calls(name: str):
    """(file, ast.Call) of every call to something named `name` (x.name(...) or name(...)) in the package."""
    import ast

    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if called == name:
                    yield path, node


def test_nothing_is_unpickled():
    """Every torch.load passes weights_only=True; nothing calls pickle.load(s)."""
    import ast

    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func, ast.Attribute)
                   and getattr(n.func.value, "id", None) == "torch"]
    assert torch_loads, "expected the .pt cache reader"
    for path, node in torch_loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{path.name}:{node.lineno}: torch.load without weights_only=True"
    pickles = [(p, n) for p, n in loads + list(_calls("loads")) if isinstance(n.func, ast.Attribute)
               and getattr(n.func.value, "id", None) in ("pickle", "dill", "cloudpickle")]
    assert pickles == []


def test_trust_remote_code_is_off_unless_asked():
    import ast
    import inspect

    from tokenwise_harness import checkpoint
    from tokenwise_harness.capture import save_xy as capture
    from tokenwise_harness.cli import build_parser

    for fn in (checkpoint.load_model, checkpoint.load_tokenizer, capture.save_xy):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    for path, node in list(_calls("from_pretrained")):
        kw = {k.arg: k.value for k in node.keywords}
        value = kw.get("trust_remote_code")
        # Unset (transformers' default is off), a literal False, or a parameter passed through; never True.
        ok = value is None or isinstance(value, ast.Name) or (isinstance(value, ast.Constant) and value.value is False)
        assert ok, f"{path.name}:{node.lineno}: trust_remote_code={ast.unparse(value)}"
    parser = build_parser()
    args = parser.parse_args(["save_xy", "--model_dir", "m", "--save_path", "s", "--label", "l"])
    assert args.trust_remote_code is False
    assert parser.parse_args(["save_xy", "--model_dir", "m", "--save_path", "s", "--label", "l",
                              "--trust_remote_code"]).trust_remote_code is True


def test_paths_inside_a_report_are_never_opened(world, tmp_path):
    """analyze writes its fixed file names under --out_dir only, whatever the report says."""
    rep = json.loads(world.report.read_text())
    rep["meta"]["xy_path"] = "../../../../../etc/passwd"
    rep["meta"]["model_dir"] = "/etc/shadow"
    rep["meta"]["xy_meta"]["model_name"] = "../../escape"
    evil = tmp_path / "in" / "evil.json"
    evil.parent.mkdir()
    evil.write_text(json.dumps(rep))
    before = set(files_under(tmp_path))
    proc = run_cli("analyze", "--report", evil, "--out_dir", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    new = set(files_under(tmp_path)) - before
    assert new and all(p.startswith("a/") for p in new), new
    assert {Path(p).name for p in new} <= {"ranking1.csv", "ranking1.md", "ranking2.csv", "ranking2.md", "heatmap.png"}


@pytest.mark.parametrize("where, key", [("by_layer", "../../etc"), ("block", "../mlp"), ("proj", "../../q_proj")],
                         ids=["layer", "block", "proj"])
def test_report_keys_that_are_paths_are_refused(world, tmp_path, where, key):
    rep = json.loads(world.report.read_text())
    layer = rep["by_layer"]["0"]
    if where == "by_layer":
        rep["by_layer"][key] = rep["by_layer"].pop("0")
    elif where == "block":
        layer[key] = layer.pop("mlp")
    else:
        layer["self_attn"]["by_proj"][key] = layer["self_attn"]["by_proj"].pop("q_proj")
    (tmp_path / "evil.json").write_text(json.dumps(rep))
    line = one_line_error(run_cli("analyze", "--report", tmp_path / "evil.json", "--out_dir", tmp_path / "a"))
    assert "--report" in line and "does not match the report schema" in line
    assert files_under(tmp_path) == ["evil.json"]


def test_malicious_model_and_case_ids_stay_inside_the_baselines_dir(tmp_path):
    from tokenwise_harness.errors import HarnessError
    from tokenwise_harness.verdict.baselines import BaselineStore, model_id

    mid = model_id("../../../etc", "fp")
    assert "/" not in mid and ".." not in mid
    store = BaselineStore(tmp_path / "baselines", mid)
    assert store.dir.parent == tmp_path / "baselines"
    for bad in ("../../layer0-x", "layer0-x/../../y", "/abs/layer0"):
        with pytest.raises(HarnessError, match="not a plain name"):
            store.path_for(bad)
    with pytest.raises(HarnessError, match="not a plain name"):
        BaselineStore(tmp_path / "baselines", "../evil")


# ---------------------------------------------------------------- resource bounds and the smooth temp dir


def test_huge_chunk_tokens_is_clamped_to_the_cache(world):
    """--chunk_tokens 10**12 used to allocate 10**12 rows per buffer; it reads the cache's tokens at once."""
    from tokenwise_harness.run import EvalSpec, run_eval

    def scores(chunk):
        spec = EvalSpec.from_text("8", "nvfp4@16", model_dir=str(world.model), xy_path=str(world.cache),
                                  chunk_tokens=chunk)
        return run_eval(spec, **QUIET)["by_layer"]

    assert scores(10**12) == scores(4096)


def test_huge_block_is_one_block_per_row(world):
    """nvfp4@4000000 used to pad every row to 4e6 columns (17.7 GB on a real weight): a block wider
    than the row is the row, the same numbers as `in`, allocated at the row's size."""
    from tokenwise_harness.numerics import formats
    from tokenwise_harness.run import EvalSpec, run_eval

    w = torch.randn(2, 200, generator=torch.Generator().manual_seed(0))
    blocks = formats.quantize_blocks(w, "nvfp4", 4_000_000)
    assert blocks.codes.shape[-1] == 200
    assert torch.equal(formats.fake_quantize(w, "nvfp4", 4_000_000), formats.fake_quantize(w, "nvfp4", "in"))

    def nmse(qspec):
        spec = EvalSpec.from_text("8", qspec, model_dir=str(world.model), xy_path=str(world.cache))
        rep = run_eval(spec, **QUIET)["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"]
        return next(iter(rep.values()))["nmse"]

    assert nmse("nvfp4@4000000") == nmse("nvfp4@in")


def test_smooth_keeps_a_model_where_its_old_temp_dir_went(world, tmp_path):
    """smooth used to `rm -rf <out parent>/.tmp-<out name>` first: a source model sitting there was deleted."""
    model = copy(world.model, tmp_path, ".tmp-s")
    before = snapshot(model)
    proc = run_cli("smooth", "--model_dir", model, "--xy_path", world.cache, "--out_dir", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(model) == before
    assert (tmp_path / "s" / "tokenwise_smooth.json").is_file()
