"""A Hugging Face model directory on disk: validation, fingerprint, and weights by name.

The engine reads allowlisted weights straight from the checkpoint's safetensors shards,
one tensor at a time, without instantiating the model (a 70B model never has to fit in RAM).
The fingerprint covers config.json and every weight file, so any change of any weight
(norms and embeddings included: they shape the cached X) makes a cache stale.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

from tokenwise_harness.allowlist import Target, parse_target
from tokenwise_harness.errors import HarnessError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# config.json fields that change without changing the model's function.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


_FILE_DIGESTS: dict[tuple, bytes] = {}


def _file_sha256(path: Path) -> bytes:
    """sha256 of a weight file, memoized per process by (path, size, mtime): one model dir is
    opened several times per run (CLI checks, the pytest session's variants and stores), and
    hashing a large checkpoint more than once would dominate start-up."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with open(path, "rb") as fh:
            _FILE_DIGESTS[key] = hashlib.file_digest(fh, "sha256").digest()
    return _FILE_DIGESTS[key]


class ModelDir:
    """A validated local model directory (`flag` names the CLI flag it came from)."""

    def __init__(self, path: str | Path, flag: str = "--model_dir"):
        self.path = Path(path)
        self.flag = flag
        if not self.path.exists():
            raise HarnessError(f"{flag} {self.path} does not exist; point it at a local Hugging Face model directory")
        if not self.path.is_dir():
            raise HarnessError(f"{flag} {self.path} is not a directory; point it at a local Hugging Face model directory")
        if not (self.path / "config.json").is_file():
            raise HarnessError(f"{flag} {self.path} has no config.json; it is not a Hugging Face model directory")
        if not self.weight_files:
            raise HarnessError(f"{flag} {self.path} has no weight files (*.safetensors or *.bin)")
        self.safetensors_index  # noqa: B018  (a corrupt shard fails here in one line, naming the file)

    @cached_property
    def config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HarnessError(f"{self.flag}: {self.path / 'config.json'} is not valid JSON ({exc})") from None

    @cached_property
    def weight_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the function-relevant config and the bytes of every weight file."""
        h = hashlib.sha256()
        cfg = {k: v for k, v in self.config.items() if k not in VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True).encode())
        for f in self.weight_files:
            h.update(f.name.encode())
            h.update(_file_sha256(f))
        return h.hexdigest()

    @cached_property
    def safetensors_index(self) -> dict[str, Path] | None:
        """tensor name -> shard file, or None when the checkpoint is not (only) safetensors."""
        shards = [f for f in self.weight_files if f.suffix == ".safetensors"]
        if not shards:
            return None
        from safetensors import safe_open

        index: dict[str, Path] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    for key in fh.keys():
                        index[key] = shard
            except Exception as exc:  # safetensors raises its own error types
                raise HarnessError(f"{self.flag}: weight file {shard} is unreadable ({exc}); re-save the model") from None
        return index

    def targets(self) -> list[Target]:
        """Allowlisted projections whose weights the shards hold, in forward order."""
        index = self.safetensors_index or {}
        found = set()
        for key in index:
            if key.endswith(".weight"):
                target = parse_target(key[: -len(".weight")])
                if target is not None:
                    found.add(target)
        return sorted(found, key=Target.sort_key)

    def read(self, name: str, device: str = "cpu"):
        """One tensor from the shards (None if absent)."""
        index = self.safetensors_index or {}
        shard = index.get(name)
        if shard is None:
            return None
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt", device=str(device)) as fh:
            return fh.get_tensor(name)


def resolve_torch_dtype(text: str | None, flag: str = "--torch_dtype"):
    """'auto'|'fp16'|'bf16'|'fp32' -> torch dtype or 'auto'."""
    import torch

    table = {
        "auto": "auto",
        None: "auto",
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if text not in table:
        raise HarnessError(f"{flag} {text!r} is unknown; use one of auto, fp16, bf16, fp32")
    return table[text]


def load_model(model_dir: ModelDir, torch_dtype: str | None = "auto", device_map: str | None = None,
               trust_remote_code: bool = False):
    """AutoModelForCausalLM from a local dir, offline, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs = {"dtype": resolve_torch_dtype(torch_dtype), "local_files_only": True,
              "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir.path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{model_dir.flag} {model_dir.path}: cannot load the model ({first})") from None
    return model.eval()


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings: our output stays one line per step."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(model_dir: ModelDir, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir.path), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{model_dir.flag} {model_dir.path}: cannot load the tokenizer ({first})") from None
