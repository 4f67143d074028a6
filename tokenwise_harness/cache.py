"""The X/Y activation cache: file format, streaming writer, lazy validated reader.

Format (seed §1.4): `{label}.safetensors` with 2-D tensors `{module_path}.X` `[N, in]` and
`{module_path}.Y` `[N, out]`, and string metadata `seed, cn, eu, length, save_dtype` plus
`format_version`, `model_fingerprint`, `data_fingerprint`, `n_tokens` and `checksums`
(a JSON object: tensor name -> sha256 of its bytes).

Compact layout (`save_xy --compact`): projections that read the same input (q/k/v,
gate/up) store it once, under the first sibling's key, and metadata `x_aliases` maps the
others' `.X` keys to it; Y is omitted (the engine recomputes it from X and the original
weight in float32). Readers resolve the aliases, so the engine sees the same entries.

The writer streams: every tensor's shape is known before the forward pass, so the header is
written first and each batch's rows are written at their final offset as the hooks produce
them. Peak memory is one batch of one module's activations, whatever the cache size. The
checksums are known only at the end; the header reserves their space with same-length
placeholders and is rewritten in place before the temp file is renamed to its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenwise_harness import memo
from tokenwise_harness.allowlist import Target, parse_target
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.host_arena import HostArena, layout, stream_slots
from tokenwise_harness.safetensors_io import DTYPES as _DTYPES
from tokenwise_harness.safetensors_io import ITEMSIZE as _ITEMSIZE
from tokenwise_harness.safetensors_io import FormatError, ParallelReader, piece_size, read_header
from tokenwise_harness.safetensors_io import byte_view as _byte_view

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = "1"
_ST_DTYPES = {"fp16": "F16", "fp32": "F32", "bf16": "BF16"}


def have_safetensors() -> bool:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Slot:
    name: str
    dtype: str
    shape: tuple[int, int]
    begin: int
    rows_written: int = 0

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * _ITEMSIZE[self.dtype]


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensors arrive row-block by row-block, in row order."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, int]], save_dtype: str, metadata: dict[str, str]):
        self.path = Path(path)
        self.dtype = _ST_DTYPES[save_dtype]
        self.metadata = dict(metadata)
        self.slots: dict[str, _Slot] = {}
        offset = 0
        for name, shape in shapes.items():
            self.slots[name] = _Slot(name, self.dtype, tuple(shape), offset)
            offset += shape[0] * shape[1] * _ITEMSIZE[self.dtype]
        self.data_bytes = offset
        self.names = set(shapes)
        self.hashes = {name: hashlib.sha256() for name in shapes}
        placeholder = {name: "0" * 64 for name in shapes}
        self.header_len = len(self._header(placeholder))
        self.fh = open(self.path, "wb")
        self.fh.write(self._header(placeholder))
        self.fh.truncate(self.header_len + self.data_bytes)

    def _header(self, checksums: dict[str, str]) -> bytes:
        meta = dict(self.metadata, checksums=json.dumps(checksums, sort_keys=True))
        header = {"__metadata__": meta}
        for slot in self.slots.values():
            nbytes = slot.shape[0] * slot.row_bytes
            header[slot.name] = {"dtype": slot.dtype, "shape": list(slot.shape),
                                 "data_offsets": [slot.begin, slot.begin + nbytes]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(len(text) + 8) % 8)  # keep the data 8-byte aligned
        return struct.pack("<Q", len(text)) + text

    def write_rows(self, name: str, rows) -> None:
        """Append the next rows (a 2-D CPU tensor already in the save dtype) of tensor `name`."""
        slot = self.slots[name]
        n = rows.shape[0]
        if slot.rows_written + n > slot.shape[0] or rows.shape[1] != slot.shape[1]:
            raise RuntimeError(f"{name}: rows beyond the declared shape {slot.shape}")
        data = rows.contiguous().view(-1).view(torch_uint8()).numpy()
        self.fh.seek(self.header_len + slot.begin + slot.rows_written * slot.row_bytes)
        self.fh.write(data)
        self.hashes[name].update(data)
        slot.rows_written += n

    def finish(self) -> None:
        missing = [s.name for s in self.slots.values() if s.rows_written != s.shape[0]]
        if missing:
            raise RuntimeError(f"capture incomplete: {missing[:3]} not fully written")
        checksums = {name: h.hexdigest() for name, h in self.hashes.items()}
        header = self._header(checksums)
        assert len(header) == self.header_len
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


def torch_uint8() -> torch.dtype:
    import torch

    return torch.uint8


def _raw_bytes(t):
    """A CPU tensor's bytes, as written (any dtype)."""
    return t.contiguous().view(-1).view(torch_uint8()).numpy()


# safetensors and torch spellings of the float dtypes a cache may hold.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"}


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class CacheEntry:
    target: Target
    x_key: str
    y_key: str | None
    in_dim: int
    out_dim: int | None


class XYCache:
    """A validated, lazily read X/Y cache (`.safetensors`, or the `.pt` fallback)."""

    def __init__(self, path: str | Path, flag: str = "--xy_path", verify: bool = True,
                 cache_root: str | Path | None = None):
        self.path = Path(path)
        # Where the verified-cache memo lives: the front end's resolved cache root, else the default one.
        self.memo_root = Path(cache_root) if cache_root is not None else memo.default_root()
        self.flag = flag
        # verify: check each tensor's sha256 as its rows stream past in order (see rows()).
        self.verify = verify
        self._streams: dict[str, tuple[int, object]] = {}  # key -> (next row, running sha256)
        self._verified: set[str] = set()
        # Bytes of each tensor handed out by rows() and stream(): what the engine's I/O costs.
        self.bytes_served: Counter[str] = Counter()
        # Where CUDA streams stage their chunks: one pinned block for the cache's lifetime (host_arena.py).
        self.arena = HostArena(pin=True, slots=stream_slots())
        if not self.path.is_file():
            raise HarnessError(f"{flag} {self.path} does not exist; create it with `tokenwise-precision save_xy`")
        if self.path.suffix == ".pt":
            self._load_pt()
        else:
            self._load_safetensors_header()
        self.entries = self._index_entries()
        if not self.entries:
            raise HarnessError(f"{flag} {self.path} holds no allowlisted `<module>.X` tensors; is it a save_xy cache?")
        self.n_tokens = self._check_rows()
        if self.n_tokens == 0:
            raise HarnessError(f"{flag} {self.path} holds 0 tokens: there is nothing to score; re-capture it with "
                               "`tokenwise-precision save_xy` (--cn/--eu/--length > 0)")
        self._check_dtypes()
        self.checksums  # noqa: B018  (a malformed checksums field fails here, not mid-run)
        if self.verify and self.checksums and memo.cache_verified(self.path, self._checksums_token, self.memo_root):
            self._verified = set(self.checksums)  # this very file passed them all before: not rehashed

    # -- header / metadata
    def _load_safetensors_header(self) -> None:
        try:
            header = read_header(self.path, sized=_FLOAT_DTYPES)  # any other dtype is refused by name below
        except FormatError as exc:
            if exc.kind == "entry":
                raise HarnessError(f"{self.flag} {self.path}: tensor {exc.tensor!r} has a malformed header entry "
                                   f"({exc}); re-create it with `tokenwise-precision save_xy`") from None
            if exc.kind == "truncated":
                raise HarnessError(f"{self.flag} {self.path} is truncated ({exc}); re-create it with "
                                   "`tokenwise-precision save_xy`") from None
            raise HarnessError(f"{self.flag} {self.path} is not a readable safetensors file ({exc}); "
                               "re-create it with `tokenwise-precision save_xy`") from None
        self.metadata = header.metadata
        self.shapes = {key: (info.dtype, info.shape) for key, info in header.tensors.items()}
        # tensor name -> absolute file offset of its first byte
        self.offsets: dict[str, int] = {key: info.offset for key, info in header.tensors.items()}
        self._pt = None

    def _load_pt(self) -> None:
        import torch

        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise HarnessError(f"{self.flag} {self.path} is not a readable .pt cache ({type(exc).__name__}); "
                               "re-create it with `tokenwise-precision save_xy`") from None
        if not isinstance(obj, dict):
            raise HarnessError(f"{self.flag} {self.path} is not a save_xy .pt cache (not a dict)")
        meta = obj.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise HarnessError(f"{self.flag} {self.path}: __metadata__ is a {type(meta).__name__}, not a mapping of "
                               "strings; re-create it with `tokenwise-precision save_xy`")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        self._pt = {k: v for k, v in obj.items() if hasattr(v, "shape")}
        self.shapes = {k: (str(v.dtype), tuple(v.shape)) for k, v in self._pt.items()}

    @property
    def meta(self) -> dict[str, str]:
        """The seed's xy_meta: every metadata field except the bulky checksums."""
        return {k: v for k, v in sorted(self.metadata.items()) if k != "checksums"}

    @cached_property
    def x_aliases(self) -> dict[str, str]:
        """Compact layout: `{module}.X` keys stored once under a sibling's key (q/k/v, gate/up)."""
        try:
            aliases = json.loads(self.metadata.get("x_aliases", "{}"))
        except ValueError:
            raise HarnessError(f"{self.flag} {self.path}: metadata x_aliases is not JSON; re-create the cache") from None
        if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and k.endswith(".X") and isinstance(v, str) for k, v in aliases.items()):
            raise HarnessError(f"{self.flag} {self.path}: metadata x_aliases is not a JSON object of `.X` key -> "
                               "stored key names; re-create the cache")
        for alias, stored in aliases.items():
            if stored not in self.shapes:
                raise HarnessError(f"{self.flag} {self.path}: {alias} points at missing tensor {stored}; "
                                   "re-create the cache")
        return aliases

    def _same_x(self) -> dict[str, str]:
        """Seed layout: `.X` tensors recorded with one checksum (and dtype and shape) hold the same
        bytes (q/k/v read one input, gate/up another), so each maps to the first of them in forward
        order and the engine streams it once for all. Sound because every tensor's bytes are still
        checked against its own checksum before anything is written (or, with a partial run, the
        bytes used are checked against the shared one); a cache without checksums is left as is."""
        first: dict[tuple, str] = {}
        same = {}
        keys = [k for k in self.shapes if k.endswith(".X") and k in self.checksums and k not in self.x_aliases]
        targets = {k: parse_target(k[:-2]) for k in keys}
        for key in sorted((k for k in keys if targets[k] is not None), key=lambda k: targets[k].sort_key()):
            stored = first.setdefault((self.checksums[key], *self.shapes[key]), key)
            if stored != key:
                same[key] = stored
        return same

    def _index_entries(self) -> list[CacheEntry]:
        entries = []
        x_keys = {k: k for k in self.shapes if k.endswith(".X")}
        x_keys.update(self.x_aliases)
        x_keys.update(self._same_x())
        for key, stored in x_keys.items():
            target = parse_target(key[:-2])
            if target is None:
                continue
            shape = self.shapes[stored][1]
            y_key = key[:-2] + ".Y"
            y_shape = self.shapes.get(y_key, (None, None))[1]
            if len(shape) != 2 or (y_shape is not None and len(y_shape) != 2):
                raise HarnessError(f"{self.flag} {self.path}: {key} is not 2-D [N, dim]; re-create the cache")
            entries.append(CacheEntry(target, stored, y_key if y_shape else None, shape[1],
                                      y_shape[1] if y_shape else None))
        entries.sort(key=lambda e: e.target.sort_key())
        return entries

    def _check_rows(self) -> int:
        rows = {self.shapes[k][1][0] for e in self.entries for k in (e.x_key, e.y_key) if k}
        if len(rows) != 1:
            raise HarnessError(f"{self.flag} {self.path}: tensors disagree on the token count {sorted(rows)}")
        return rows.pop()

    @cached_property
    def targets(self) -> list[Target]:
        return [e.target for e in self.entries]

    @cached_property
    def _entry_of(self) -> dict[Target, CacheEntry]:
        return {e.target: e for e in self.entries}

    def entry(self, target: Target) -> CacheEntry:
        # A dict, not a scan: the engine and the plugin look entries up per weight and per case.
        found = self._entry_of.get(target)
        if found is None:
            raise HarnessError(f"{self.flag} {self.path} has no key {target.path}.X")
        return found

    def _check_dtypes(self) -> None:
        for e in self.entries:
            for key in (e.x_key, e.y_key):
                if key and self.shapes[key][0] not in _FLOAT_DTYPES:
                    raise HarnessError(f"{self.flag} {self.path}: {key} has dtype {self.shapes[key][0]}, not a "
                                       "float type (fp16/bf16/fp32); re-create it with `tokenwise-precision save_xy`")

    # -- tensors
    @cached_property
    def _handle(self):
        from safetensors import safe_open

        try:
            return safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise HarnessError(f"{self.flag} {self.path} is not a readable safetensors file ({exc}); "
                               "re-create it with `tokenwise-precision save_xy`") from None

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of one cached tensor, as stored (CPU).

        With `verify`, a tensor read front to back in consecutive slices (as the engine and
        smoothing stream it) is hashed on the way, and its sha256 is checked against the
        metadata when the last row goes by: a flipped bit fails the run before any report is
        written, at the cost of one hash pass over bytes that are being read anyway.
        """
        t = self._pt[key][start:end] if self._pt is not None else self._handle.get_slice(key)[start:end]
        self.bytes_served[key] += t.numel() * t.element_size()
        if self.verify and key in self.checksums and key not in self._verified and not self._hashed_elsewhere(key):
            self._hash_rows(key, start, t)
        return t

    def verify_in_background(self, workers: int | None = None) -> None:
        """Hash every checksummed tensor on a thread pool while the engine runs; wait_verified() joins.

        sha256 runs near 1 GB/s per core, slower than the engine consumes a cache on a GPU;
        hashing tensors in parallel, beside the engine instead of inside its read loop, takes
        it off the critical path. Nothing may be written before wait_verified() returns.
        """
        if not self.verify or self._pt is not None:
            return
        from concurrent.futures import ThreadPoolExecutor

        keys = [k for k in self.checksums if k in self.offsets and k not in self._verified]
        if not keys:
            return
        self._bg_pool = ThreadPoolExecutor(max_workers=workers or max(1, min(8, (os.cpu_count() or 2) - 1)))
        self._background = {k: self._bg_pool.submit(self._file_digest, k) for k in keys}

    def wait_verified(self) -> None:
        """Join the background verification; a mismatch is a HarnessError naming the tensor."""
        background = getattr(self, "_background", {})
        try:
            for key, future in background.items():
                self._check_digest(key, future.result())
        finally:
            if background:
                self._bg_pool.shutdown(cancel_futures=True)
                self._background = {}

    def stop_background(self) -> None:
        """Abandon the background verification (the run failed for another reason)."""
        if getattr(self, "_background", None):
            self._bg_pool.shutdown(wait=True, cancel_futures=True)
            self._background = {}

    def _file_digest(self, key: str) -> str:
        """sha256 of one tensor's bytes, read straight from the file in 16 MiB blocks."""
        dtype, shape = self.shapes[key]
        nbytes = _ITEMSIZE.get(dtype, 4) * shape[0] * shape[1]
        h, buf = hashlib.sha256(), bytearray(16 << 20)
        view = memoryview(buf)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[:min(len(buf), nbytes - done)]], self.offsets[key] + done)
                if got <= 0:
                    return ""
                h.update(view[:got])
                done += got
        finally:
            os.close(fd)
        return h.hexdigest()

    def _hashed_elsewhere(self, key: str) -> bool:
        return key in getattr(self, "_background", {})

    def torch_dtype(self, key: str) -> torch.dtype:
        """The stored dtype of one tensor, as a torch dtype."""
        import torch

        stored = self.shapes[key][0]
        return getattr(torch, _TORCH_DTYPES.get(stored, stored.replace("torch.", "")))

    def stream(self, keys: list[str | None], chunk_tokens: int, device: str, *, threads: int | None = None,
               piece_bytes: int | None = None) -> Iterator[tuple[int, int, list[torch.Tensor | None]]]:
        """Yield (start, end, [rows of each key on `device`]) over every token, chunk by chunk.

        The fast path for the engine: each chunk is read with plain positioned reads by
        background threads (on CUDA into the cache's pinned arena, copied to the device
        asynchronously; on the CPU straight into the tensor that is yielded) while the caller
        computes on the previous chunk. Each key's rows of a chunk are split into pieces read
        side by side (`threads` readers, default one per core up to 16; `piece_bytes` each,
        default sized from the chunk), since one reading thread is slower than the file system.
        With `verify` the bytes are hashed in file order as they land.
        Host memory on CUDA stays at the arena: one chunk of the widest stream the run opens
        (two with TOKENWISE_STREAM_SLOTS=2; reserve_for), one block for every stream, never grown
        once reserved; on the CPU the yielded tensors are the caller's. No file pages are mapped
        into the process.
        A None key yields None. `chunk_tokens` beyond the cache's token count is clamped to it
        (a huge --chunk_tokens allocates no more than the cache holds).
        """
        chunk_tokens = self._clamp_chunk(chunk_tokens)
        if self._pt is not None or not all(k is None or k in self.offsets for k in keys):
            for start in range(0, self.n_tokens, chunk_tokens):
                end = min(start + chunk_tokens, self.n_tokens)
                yield start, end, [None if k is None else self.rows(k, start, end).to(device) for k in keys]
            return
        yield from _ChunkStream(self, list(keys), chunk_tokens, device, threads, piece_bytes)

    def _clamp_chunk(self, chunk_tokens: int) -> int:
        return max(1, min(int(chunk_tokens), self.n_tokens))

    def stream_slot_bytes(self, keys: list[str | None], chunk_tokens: int) -> int:
        """Arena bytes one slot of a CUDA stream of `keys` takes: one page-aligned chunk per
        distinct key (0 for a cache that streams without the arena: the .pt fallback)."""
        if self._pt is not None:
            return 0
        chunk = self._clamp_chunk(chunk_tokens)
        live = dict.fromkeys(k for k in keys if k is not None)
        return layout([chunk * self.shapes[k][1][1] * _ITEMSIZE[self.shapes[k][0]] for k in live])[1]

    def reserve_for(self, targets, chunk_tokens: int, grouped: bool = True) -> None:
        """Size the pinned arena up front for every stream scoring `targets` will open (grouped:
        one per input group, its X and each weight's Y; else one per weight, its X and Y), so it
        is allocated once, at the first CUDA stream, and never grows mid-run. Allocates nothing
        itself (nothing at all on the CPU)."""
        groups: dict[object, list[str | None]] = {}
        for target in targets:
            e = self._entry_of.get(target)
            if e is not None:
                groups.setdefault(e.x_key if grouped else target, [e.x_key]).append(e.y_key)
        self.arena.reserve(max((self.stream_slot_bytes(keys, chunk_tokens) for keys in groups.values()), default=0))

    def allocate_arena(self, device) -> None:
        """Page-lock the arena reserved so far now, when the streams will be on CUDA (page-locking
        a chunk of the widest group took 0.07-0.1 s on the H200), so the first stream finds it
        ready. Nothing for the CPU, the .pt fallback or an arena already in use."""
        if str(device).startswith("cuda") and self._pt is None and self.arena.reserved and not self.arena.busy:
            self.arena.ensure(self.arena.reserved)

    def close(self) -> None:
        """Release the pinned arena (the cache stays usable: a later CUDA stream allocates it again)."""
        self.arena.release()

    def _hash_rows(self, key: str, start: int, t) -> None:
        running = hashlib.sha256() if start == 0 else self._streams.get(key, (None, None))[1]
        if running is None or (start != 0 and self._streams[key][0] != start):
            self._streams.pop(key, None)  # read out of order: this pass cannot be checked
            return
        running.update(_raw_bytes(t))
        end = start + t.shape[0]
        if end < self.shapes[key][1][0]:
            self._streams[key] = (end, running)
            return
        self._streams.pop(key, None)
        self._check_digest(key, running.hexdigest())

    def _check_digest(self, key: str, got: str) -> None:
        if got != self.checksums[key]:
            raise HarnessError(f"{self.flag} {self.path}: tensor {key} fails its checksum (corrupted file); "
                               "re-create it with `tokenwise-precision save_xy`")
        newly = key not in self._verified
        self._verified.add(key)
        if newly and self._verified.issuperset(self.checksums):  # the last one: remember the whole file
            memo.remember_cache_verified(self.path, self._checksums_token, self.memo_root)

    @cached_property
    def _checksums_token(self) -> str:
        """What a verified-cache memo entry vouches for: this checksum set (with the file's identity)."""
        return hashlib.sha256(json.dumps(sorted(self.checksums.items())).encode()).hexdigest()

    @cached_property
    def checksums(self) -> dict[str, str]:
        """tensor name -> sha256 hex digest, from the metadata ({} when the cache has none)."""
        text = self.metadata.get("checksums")
        try:
            sums = json.loads(text) if text else {}
        except ValueError:
            sums = None
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise HarnessError(f"{self.flag} {self.path}: metadata 'checksums' is not a JSON object of sha256 "
                               "digests; re-create it with `tokenwise-precision save_xy`")
        return sums

    def verify_tensor(self, key: str) -> None:
        """Hash one whole tensor now against its checksum (no-op without one, or when verified)."""
        if key not in self.checksums or key in self._verified:
            return
        t = self._handle.get_tensor(key) if self._pt is None else self._pt[key]
        self._check_digest(key, hashlib.sha256(_raw_bytes(t)).hexdigest())

    def verify_checksums(self) -> None:
        """Recompute every tensor's sha256 against the metadata up front (bit flips, partial copies)."""
        for key in self.checksums:
            if key not in self.shapes:
                raise HarnessError(f"{self.flag} {self.path}: tensor {key} is missing; re-create the cache")
            self.verify_tensor(key)

    def check_model(self, fingerprint: str, model_flag: str, refresh_hint: str) -> None:
        """Refuse a cache captured from another model (or a model whose weights changed since)."""
        stored = self.metadata.get("model_fingerprint")
        if stored and stored != fingerprint:
            raise HarnessError(f"{self.flag} {self.path} was captured from a different model than {model_flag} "
                               f"(fingerprint {stored[:12]} != {fingerprint[:12]}); refresh it: {refresh_hint}")


_TORCH_DTYPES = {name: torch_name for name, (_, torch_name) in _DTYPES.items()}


class _ChunkStream:
    """Prefetching reader behind XYCache.stream (see there): on CUDA into the arena's slot(s), on the CPU double-buffered.

    Each key's rows of one chunk are one byte range; it is read as several positioned reads
    side by side (safetensors_io.ParallelReader, `threads` workers, `piece_bytes` each), every
    piece straight into its place in the key's buffer for that slot. A key that is verified
    here has its own one-thread hasher, which hashes a chunk once all its pieces have landed,
    chunk after chunk in order, while the caller computes on the previous chunk.

    On CUDA the slots' buffers are views of the cache's pinned arena (host_arena.py). Each key's
    rows of a chunk are copied to the device as soon as all their pieces have landed, on a copy
    stream of the stream's own, while the other keys are still being read and the GPU computes
    on earlier chunks. (Queued on the caller's stream, the copy waited behind the previous
    chunk's work, and with one slot the next chunk's reads waited for both. Copying each piece
    from the thread that read it was slower still: the reader threads then fought the caller's
    thread for the GIL.) The caller's stream waits for the copy stream before it sees a chunk,
    and each yielded tensor is marked as used there, so the allocator never hands its memory to
    a later chunk's copy too early. A read into a key's view waits for the arena's event after
    that key's last copy out of the slot. A stream opened while another still holds the arena
    (one abandoned mid-way, its frame still alive) gets an arena of its own, released when it
    ends. On the CPU two slots of plain tensors alternate, replaced by new ones once the caller
    holds those (it keeps what is yielded).
    """

    def __init__(self, cache: XYCache, keys: list[str | None], chunk_tokens: int, device,
                 threads: int | None = None, piece_bytes: int | None = None):
        import torch

        self.cache, self.keys, self.chunk, self.device = cache, keys, chunk_tokens, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threads, self.piece_bytes = threads, piece_bytes
        live = list(dict.fromkeys(k for k in keys if k is not None))
        self.specs = [(k, (chunk_tokens, cache.shapes[k][1][1]), cache.torch_dtype(k)) for k in live]
        self.buffers: list[dict] = []
        self.arena: HostArena | None = None
        self.copy_stream = None  # CUDA: where each key's copy to the device is queued
        self.hashers = {k: hashlib.sha256() for k in live if cache.verify and k in cache.checksums
                        and k not in cache._verified and not cache._hashed_elsewhere(k)}

    def __iter__(self):
        import torch

        if not self.cuda:
            self.buffers = [{k: torch.empty(shape, dtype=dtype) for k, shape, dtype in self.specs} for _ in range(2)]
            yield from self._run()
            return
        shared = self.cache.arena.acquire()
        self.arena = self.cache.arena if shared else HostArena(pin=True, slots=self.cache.arena.slots)
        self.copy_stream = torch.cuda.Stream(self.device)
        try:
            self.buffers = [self.arena.carve(slot, self.specs) for slot in range(self.arena.slots)]
            yield from self._run()
        finally:
            self.buffers = []
            if shared:
                self.arena.done()
            else:
                self.arena.release()

    def _run(self):
        from concurrent.futures import ThreadPoolExecutor

        starts = list(range(0, self.cache.n_tokens, self.chunk))
        chunk_bytes = sum(b[0].numel() * b[0].element_size() for b in self.buffers[0].values())
        reader = ParallelReader(self.threads, self.piece_bytes)
        if self.piece_bytes is None:
            reader.piece_bytes = piece_size(chunk_bytes, reader.threads)
        hash_pools = {k: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwise-hash") for k in self.hashers}
        fd = os.open(self.cache.path, os.O_RDONLY)
        try:
            pending = self._submit(reader, hash_pools, fd, starts, 0)
            for i, start in enumerate(starts):
                out = self._land(i, start, pending)  # copies queued before chunk i+1 is read (one slot: same memory)
                pending = self._submit(reader, hash_pools, fd, starts, i + 1) if i + 1 < len(starts) else []
                yield start, min(start + self.chunk, self.cache.n_tokens), out
        finally:
            reader.close()  # joins every read before the descriptor is closed
            for pool in hash_pools.values():
                pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)
        for key, h in self.hashers.items():
            self.cache._check_digest(key, h.hexdigest())

    def _submit(self, reader, hash_pools, fd, starts, i):
        """Queue the pieces of chunk i of every key into slot i % slots (each piece first waits
        for its key's last copy out of that slot to the device), and each verified key's hash of
        it. Returns [(key, its pieces' futures, its hash's future or None)]."""
        start = starts[i]
        n = min(self.chunk, self.cache.n_tokens - start)
        slot = i % len(self.buffers)
        if not self.cuda and i >= 2:  # the caller owns the CPU tensors yielded from this slot: read into new ones
            self.buffers[slot] = {k: b.new_empty(b.shape) for k, b in self.buffers[slot].items()}
        futures = []
        for key, buf in self.buffers[slot].items():
            copied = self.arena.last_copy(slot, key) if self.cuda else None
            before = copied.synchronize if copied is not None else None
            view = _byte_view(buf[:n])
            row_bytes = buf.shape[1] * buf.element_size()
            what = (f"{self.cache.flag} {self.cache.path}: unexpected end of file reading {key}; "
                    "re-create it with `tokenwise-precision save_xy`")
            parts = reader.submit(fd, view, self.cache.offsets[key] + start * row_bytes, what, before)
            self.cache.bytes_served[key] += len(view)
            hashed = hash_pools[key].submit(_hash_after, parts, self.hashers[key], view) if key in hash_pools else None
            futures.append((key, parts, hashed))
        return futures

    def _land(self, i, start, pending):
        """Chunk i's rows of self.keys, once read: on CUDA each key's copy to the device is queued
        as soon as its pieces have landed; every hash of the chunk is done before this returns
        (chunk i+1 is read into the same host memory)."""
        n = min(self.chunk, self.cache.n_tokens - start)
        slot = i % len(self.buffers)
        landed = {}
        for key, parts, _ in pending:
            for f in parts:
                f.result()
            rows = self.buffers[slot][key][:n]
            if self.cuda:
                rows = self._copy(rows)
                self.arena.record(slot, key, self.copy_stream)  # its next rows are read once this copy is done
            landed[key] = rows
        for _, _, hashed in pending:
            if hashed is not None:
                hashed.result()
        if self.cuda:
            import torch

            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            for t in landed.values():
                t.record_stream(compute)  # freed by the caller: not reused before its work here is done
        return [None if key is None else landed[key] for key in self.keys]

    def _copy(self, rows):
        import torch

        with torch.cuda.stream(self.copy_stream):
            return rows.to(self.device, non_blocking=True)


def _hash_after(parts, hasher, view) -> None:
    """Hash one chunk of one key once all its pieces have landed (in chunk order: one thread per key)."""
    for f in parts:
        f.result()
    hasher.update(view)
