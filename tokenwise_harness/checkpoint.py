"""A Hugging Face model directory on disk: validation, fingerprint, and weights by name.

The engine reads allowlisted weights straight from the checkpoint's safetensors shards,
one tensor at a time, without instantiating the model (a 70B model never has to fit in RAM).
The fingerprint covers config.json and every weight file the model loads (the index's shards,
or model.safetensors; never a stray file beside them), so any change of any weight (norms and
embeddings included: they shape the cached X) makes a cache stale. File digests are memoized
on disk (memo.py, under the cache root the ModelDir is given: `cache_root`), so a rerun on an
unchanged checkpoint reads no weight bytes for it; on a cold memo the CLI hashes them beside
the engine (ModelDir.start_fingerprint, run.Evaluation).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenwise_harness.allowlist import Target, parse_target
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.safetensors_io import FormatError, TensorInfo, read_header, read_tensor

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SMOOTH_META_FILE = "tokenwise_smooth.json"  # written by calib.smooth into a smoothed model dir
# config.json fields that change without changing the model's function.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
# What transformers' from_pretrained loads, in its order of preference: a single file, or an
# index whose weight_map names the shards. Nothing else in the dir is a weight file.
LOADED_WEIGHTS = (("model.safetensors", None), ("model.safetensors.index.json", "index"),
                  ("pytorch_model.bin", None), ("pytorch_model.bin.index.json", "index"))


def _file_sha256(path: Path, root: Path) -> bytes:
    """sha256 of a weight file: memoized in this process and on disk under the cache root `root`
    by (path, inode, size, mtime_ns), so a rerun on an unchanged checkpoint reads no weight bytes
    (memo.file_digest)."""
    from tokenwise_harness.memo import file_digest

    return bytes.fromhex(file_digest(path, root))


def _file_digests(files: list[Path], root: Path) -> list[bytes]:
    """_file_sha256 of every file, the shards hashed side by side (sha256 runs without the GIL)."""
    if len(files) <= 1:
        return [_file_sha256(f, root) for f in files]
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda f: _file_sha256(f, root), files))


class ModelDir:
    """A validated local model directory (`flag` names the CLI flag it came from).

    `cache_root`: the cache root its weight-file digests are memoized under and the engine keeps
    its low-rank factors under (the front end's cache_store.resolve_root); None: memo.default_root()."""

    def __init__(self, path: str | Path, flag: str = "--model_dir", cache_root: str | Path | None = None):
        from tokenwise_harness.memo import default_root

        self.path = Path(path)
        self.flag = flag
        self.cache_root = Path(cache_root) if cache_root is not None else default_root()
        if not self.path.exists():
            raise HarnessError(f"{flag} {self.path} does not exist; point it at a local Hugging Face model directory")
        if not self.path.is_dir():
            raise HarnessError(f"{flag} {self.path} is not a directory; point it at a local Hugging Face model directory")
        if not (self.path / "config.json").is_file():
            raise HarnessError(f"{flag} {self.path} has no config.json; it is not a Hugging Face model directory")
        if not self.weight_files:
            raise HarnessError(f"{flag} {self.path} has no weight files (model.safetensors, "
                               "model.safetensors.index.json or pytorch_model.bin)")
        self._tensor_info: dict[Path, dict[str, TensorInfo]] = {}  # shard -> its header (safetensors_index)
        self.config  # noqa: B018  (a config.json that is not an object fails here, in one line)
        self.safetensors_index  # noqa: B018  (a corrupt shard fails here in one line, naming the file)

    @cached_property
    def config(self) -> dict:
        try:
            config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise HarnessError(f"{self.flag}: {self.path / 'config.json'} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise HarnessError(f"{self.flag}: {self.path / 'config.json'} is a JSON {type(config).__name__}, not an "
                               "object; restore the model's config.json")
        return config

    @cached_property
    def weight_files(self) -> list[Path]:
        """The files the model loads, as transformers picks them: model.safetensors, else the
        shards model.safetensors.index.json names, else pytorch_model.bin (or its index's shards).
        Stray files beside them (an old shard, a cache saved into the dir) are never read."""
        for name, kind in LOADED_WEIGHTS:
            f = self.path / name
            if not f.is_file():
                continue
            if kind is None:
                return [f]
            return [self.path / shard for shard in sorted(set(self._weight_map(f).values()))]
        return []

    def _weight_map(self, index_file: Path) -> dict[str, str]:
        """tensor name -> shard file name, from an index file (validated)."""
        try:
            data = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HarnessError(f"{self.flag}: {index_file} is not valid JSON ({exc}); re-save the model") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
                for v in weight_map.values()):
            raise HarnessError(f"{self.flag}: {index_file} has no valid weight_map (tensor name -> shard file "
                               "in this dir); re-save the model")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise HarnessError(f"{self.flag}: {index_file} names shard {shard}, which is missing from "
                                   f"{self.path}; copy the whole checkpoint")
        return weight_map

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the function-relevant config and the bytes of every weight file.

        After start_fingerprint: the background hash's result (waited for here), once every
        callback queued with when_fingerprinted has run."""
        hashing = self._hashing
        return hashing.result() if hashing is not None else self._compute_fingerprint()

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        cfg = {k: v for k, v in self.config.items() if k not in VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True).encode())
        for f, digest in zip(self.weight_files, _file_digests(self.weight_files, self.cache_root)):
            h.update(f.name.encode())
            h.update(digest)
        return h.hexdigest()

    # The fingerprint hashed beside the engine (the CLI's eval path; run.Evaluation decides).
    _hashing = None  # a Future of the fingerprint while (or after) a background thread hashes
    _waiting: list | None = None  # callbacks run when it is known (when_fingerprinted)

    def start_fingerprint(self) -> bool:
        """Hash the weight files on a background thread when a digest memo lacks one of them;
        True if it started. With every file's digest memoized (a warm memo) nothing starts:
        `fingerprint` is then computed on demand as before, reading no weight bytes."""
        import threading

        if self._hashing is not None or "fingerprint" in self.__dict__:
            return False
        from tokenwise_harness.memo import known_digest

        if all(known_digest(f, self.cache_root) is not None for f in self.weight_files):
            return False
        from concurrent.futures import Future

        self._hashing, self._waiting, self._lock = Future(), [], threading.Lock()
        threading.Thread(target=self._hash_in_background, name="tokenwise-fingerprint", daemon=True).start()
        return True

    def _hash_in_background(self) -> None:
        try:
            fingerprint = self._compute_fingerprint()
        except BaseException as exc:  # noqa: BLE001  (re-raised by `fingerprint` in the caller's thread)
            with self._lock:
                waiting, self._waiting = self._waiting, None
            self._hashing.set_exception(exc)
            return
        with self._lock:
            waiting, self._waiting = self._waiting, None  # from now on when_fingerprinted runs at once
        for fn in waiting:
            try:
                fn()
            except Exception:  # noqa: BLE001, S110  (a memo write that fails is skipped, never an error)
                pass
        self._hashing.set_result(fingerprint)

    def fingerprint_if_known(self) -> str | None:
        """The fingerprint without waiting: None while the background hash still runs."""
        hashing = self._hashing
        if hashing is not None and not hashing.done():
            return None
        return self.fingerprint

    def when_fingerprinted(self, fn) -> None:
        """Run fn() once the fingerprint is known (on the hashing thread; at once if it is known):
        how factors decomposed before a weight's digest was known reach the low-rank store."""
        if self._hashing is not None:
            with self._lock:
                if self._waiting is not None:
                    self._waiting.append(fn)
                    return
        fn()

    @cached_property
    def safetensors_index(self) -> dict[str, Path] | None:
        """tensor name -> shard file, or None when the checkpoint is not safetensors.

        With an index file, its weight_map decides which shard holds a tensor (a tensor that
        also sits in another file is read from the named shard only). Only the shards' headers
        are read here (safetensors_io.read_header); read() uses them to find each tensor's bytes."""
        shards = [f for f in self.weight_files if f.suffix == ".safetensors"]
        if not shards:
            return None
        index_file = self.path / "model.safetensors.index.json"
        named = (self._weight_map(index_file) if len(shards) > 1 or shards[0].name != "model.safetensors"
                 else None)
        index: dict[str, Path] = {}
        for shard in shards:
            try:
                header = read_header(shard)
            except FormatError as exc:
                if exc.kind == "truncated":
                    raise HarnessError(f"{self.flag}: weight file {shard} is truncated ({exc}); copy the whole "
                                       "checkpoint again") from None
                what = f"tensor {exc.tensor!r} has a malformed header entry: {exc}" if exc.tensor else str(exc)
                raise HarnessError(f"{self.flag}: weight file {shard} is unreadable ({what}); re-save the model") from None
            self._tensor_info[shard] = header.tensors
            for key, info in header.tensors.items():
                if named is None or named.get(key) == shard.name:
                    index[key] = shard
                    if key.endswith(".weight") and parse_target(key[: -len(".weight")]) is not None \
                            and len(info.shape) != 2:
                        raise HarnessError(f"{self.flag} {self.path}: {key} in {shard.name} has shape "
                                           f"{info.shape}, not the 2-D [out, in] of a linear weight; re-save "
                                           "the model")
        if named is not None:
            absent = sorted(set(named) - set(index))
            if absent:
                raise HarnessError(f"{self.flag}: {index_file} places {absent[0]} in {named[absent[0]]}, which does "
                                   "not hold it; re-save the model")
        return index

    def tensor_info(self, name: str) -> TensorInfo | None:
        """dtype, shape and byte range of one stored tensor (None if absent)."""
        shard = (self.safetensors_index or {}).get(name)
        return None if shard is None else self._tensor_info[shard][name]

    def tensor_id(self, name: str) -> str | None:
        """A content id of one stored tensor (its file's digest and its name), None if absent.
        Costs no hashing beyond the fingerprint's own (memoized) file digests. While the
        fingerprint hashes in the background (start_fingerprint), None until its file's digest
        is known: never a second hash of the same file, never a wait."""
        shard = (self.safetensors_index or {}).get(name)
        if shard is None:
            return None
        hashing = self._hashing
        if hashing is not None and not hashing.done():
            from tokenwise_harness.memo import known_digest

            digest = known_digest(shard, self.cache_root)
            return None if digest is None else f"{digest}:{name}"
        return f"{_file_sha256(shard, self.cache_root).hex()}:{name}"

    @cached_property
    def smoothed(self) -> bool:
        """Whether this is a smoothed model dir (`tokenwise-precision smooth`): W*s in the shards."""
        index = self.safetensors_index or {}
        return (self.path / SMOOTH_META_FILE).is_file() or any(k.endswith(".smooth_factor") for k in index)

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

    def read(self, name: str, device: str = "cpu") -> torch.Tensor | None:
        """One tensor from the shards (None if absent), read by positioned reads of exactly its
        bytes (safetensors_io.read_tensor): the shard is never mapped into the process, so host
        memory holds this tensor (on CUDA: a few pinned staging pieces), not the file's pages."""
        index = self.safetensors_index or {}
        shard = index.get(name)
        if shard is None:
            return None
        return read_tensor(shard, name, self._tensor_info[shard][name], str(device), flag=self.flag)


def resolve_torch_dtype(text: str | None, flag: str = "--torch_dtype") -> torch.dtype | str:
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
               trust_remote_code: bool = False) -> torch.nn.Module:
    """AutoModelForCausalLM from a local dir, offline, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs = {"dtype": resolve_torch_dtype(torch_dtype), "local_files_only": True,
              "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir.path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: a weight of the wrong shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{model_dir.flag} {model_dir.path}: cannot load the model ({first})") from None
    return model.eval()


def load_model_layers(model_dir: ModelDir, layers: set[int], torch_dtype: str | None = "auto",
                      device: str = "cpu", trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model with only the decoder layers `layers` materialized, or None where that cannot be done.

    Built from config.json on the meta device; every other decoder layer is replaced by an empty
    placeholder module (so a walk over named_modules(), fake_op's included, sees only the kept
    layers' linears), and the kept layers are materialized on `device` and loaded tensor by tensor
    from the safetensors shards (weights, biases, norms), in the dtype from_pretrained would use.
    Embeddings, lm_head and the final norm stay on meta: the model is not runnable end to end.
    None (the caller loads the whole model instead) for a .bin checkpoint, when `layers` covers
    every layer, or when the checkpoint or the architecture does not fit a partial load.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    index = model_dir.safetensors_index
    if index is None:
        return None
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(model_dir.path), local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        dtype = resolve_torch_dtype(torch_dtype)
        if dtype == "auto":
            dtype = _auto_dtype(config, model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        decoder = model.get_submodule("model.layers")
    except Exception:  # noqa: BLE001  (the whole load reports the problem in its own words)
        return None
    if not isinstance(decoder, torch.nn.ModuleList) or not set(layers) < set(range(len(decoder))):
        return None
    for i in range(len(decoder)):
        if i not in layers:
            decoder[i] = torch.nn.Module()  # a placeholder: holds nothing, named_modules() stops at it
    for i in sorted(layers):
        layer = decoder[i]
        persistent = layer.state_dict()
        if sum(1 for _ in layer.buffers()) != sum(1 for k in persistent if k not in dict(layer.named_parameters())):
            return None  # a non-persistent buffer (computed at init) would be left uninitialized
        layer.to_empty(device=device)
        state = {}
        for name in persistent:
            tensor = model_dir.read(f"model.layers.{i}.{name}", device)
            if tensor is None:
                return None  # a tensor from_pretrained would initialize itself: let it
            state[name] = tensor
        try:
            with torch.no_grad():
                layer.load_state_dict(state, strict=True)
        except RuntimeError:  # a shape mismatch: the whole load names it
            return None
    return model.eval()


def _auto_dtype(config, model_dir: ModelDir) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") loads in: config.json's, else the checkpoint's first float tensor's."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    from tokenwise_harness.safetensors_io import torch_dtype

    for name in sorted(model_dir.safetensors_index or {}):
        kind = torch_dtype(model_dir.tensor_info(name).dtype)
        if kind is not None and kind.is_floating_point and kind.itemsize >= 2:
            return kind
    return torch.float32


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings: our output stays one line per step."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(model_dir: ModelDir, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir.path), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{model_dir.flag} {model_dir.path}: cannot load the tokenizer ({first})") from None
