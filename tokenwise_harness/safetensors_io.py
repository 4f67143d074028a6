"""The one safetensors header parser and positioned-read path, for cache files and weight shards.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data_offsets relative to the data start; optional `__metadata__`), then the
data. `read_header` parses and validates it without mapping the file; `ParallelReader` reads
byte ranges with several positioned reads (os.preadv) side by side on a small thread pool
(one reader thread tops out near 3 GB/s in a sandbox, below what the file system delivers),
into a tensor's own memory: no file pages are mapped into the process (mapped pages of a
tmpfs file count as resident memory), and each piece lands at its own offset.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenwise_harness.envvars import int_setting
from tokenwise_harness.errors import HarnessError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (item size in bytes, torch dtype name)
DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
          "U8": (1, "uint8"), "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2")}
ITEMSIZE = {k: v[0] for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20
PIECE_MIN, PIECE_MAX = 2 << 20, 32 << 20  # bytes per positioned read


# CUDA weight reads stage through STAGING_SLOTS pinned pieces of STAGING_PIECE bytes per read (with
# the engine's 4 prefetching workers: 4 x 4 x 8 MiB of pinned host memory, reused by torch's caching
# host allocator), read side by side and copied to the device as each lands.
STAGING_PIECE, STAGING_SLOTS = 8 << 20, 4


def read_threads() -> int:
    """Reader threads per read: one per core (sandboxed reads are CPU-bound copies), 2..16;
    TOKENWISE_READ_THREADS overrides (1 = one read per range, the old way)."""
    return int_setting("TOKENWISE_READ_THREADS", max(2, min(16, os.cpu_count() or 2)))


class FormatError(ValueError):
    """A safetensors file that cannot be used. kind: 'unreadable' (no header), 'entry' (one
    tensor's entry is malformed: `tensor` names it) or 'truncated' (data shorter than promised)."""

    def __init__(self, kind: str, detail: str, tensor: str | None = None):
        super().__init__(detail)
        self.kind, self.tensor = kind, tensor


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class Header:
    size: int  # file size in bytes
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in the header's order


def entry_problem(info, sized=ITEMSIZE) -> str | None:
    """Why a header entry is unusable (None: it is fine): wrong types, a byte range that is not
    [begin, end] or does not match the shape of a tensor of a dtype in `sized`."""
    if not isinstance(info, dict):
        return "not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return "dtype is not a string"
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        return "shape is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return "data_offsets is not [begin, end]"
    if dtype in sized and dtype in ITEMSIZE and offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
        return f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}"
    return None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path, sized=ITEMSIZE) -> Header:
    """Parse and validate a safetensors header (reads only the header). Raises FormatError.
    `sized`: the dtypes whose byte ranges are checked against their shapes (a caller that
    refuses other dtypes itself, with its own message, passes the ones it accepts)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise FormatError("unreadable", "file shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw)
            size = os.fstat(fh.fileno()).st_size
            if hlen > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError("unreadable", "header length runs past the end of the file")
            header = json.loads(fh.read(hlen))
    except RecursionError:
        raise FormatError("unreadable", "its header nests too deeply") from None
    except FormatError:
        raise
    except (OSError, ValueError) as exc:
        raise FormatError("unreadable", str(exc)) from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise FormatError("unreadable", "the header is not a JSON object of tensors")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    tensors, end = {}, 0
    for key, info in header.items():
        problem = entry_problem(info, sized)
        if problem:
            raise FormatError("entry", problem, key)
        begin, stop = info["data_offsets"]
        tensors[key] = TensorInfo(info["dtype"], tuple(info["shape"]), 8 + hlen + begin, stop - begin)
        end = max(end, stop)
    if 8 + hlen + end > size:
        raise FormatError("truncated", f"{size} bytes, header promises {8 + hlen + end}")
    return Header(size, metadata, tensors)


def torch_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (None: not one this torch has)."""
    import torch

    entry = DTYPES.get(dtype)
    return getattr(torch, entry[1], None) if entry else None


def pieces(nbytes: int, piece_bytes: int) -> list[tuple[int, int]]:
    """[begin, end) byte ranges of at most piece_bytes covering [0, nbytes)."""
    step = max(1, int(piece_bytes))
    return [(b, min(b + step, nbytes)) for b in range(0, nbytes, step)]


def piece_size(total_bytes: int, threads: int) -> int:
    """Bytes per positioned read: about two pieces per thread, within PIECE_MIN..PIECE_MAX."""
    return max(PIECE_MIN, min(PIECE_MAX, -(-total_bytes // max(1, 2 * threads))))


def pread_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill `view` from file offset `offset`; a short read is a HarnessError naming `what`."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise HarnessError(what)
        done += got


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes."""
    import torch

    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray(0))


class ParallelReader:
    """Positioned reads of byte ranges, split into pieces read side by side on a thread pool.

    `submit(fd, view, offset, what, before=None)` queues the pieces of one range and returns
    their futures; each piece lands at its own place in `view` (the bytes end up exactly where
    one sequential read would put them). `before` runs in the worker before its piece is read
    (e.g. waiting for the CUDA copy that last read the buffer). Use as a context manager: the
    pool is joined on exit, so no read outlives the file descriptor.
    """

    def __init__(self, threads: int | None = None, piece_bytes: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = threads or read_threads()
        self.piece_bytes = piece_bytes
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tokenwise-read")

    def submit(self, fd: int, view: memoryview, offset: int, what: str, before=None, piece_bytes: int | None = None):
        step = piece_bytes or self.piece_bytes or piece_size(len(view), self.threads)
        return [self.pool.submit(_read_piece, fd, view[b:e], offset + b, what, before)
                for b, e in pieces(len(view), step)]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_piece(fd, view, offset, what, before):
    if before is not None:
        before()
    pread_exact(fd, view, offset, what)


def read_tensor(path, name: str, info: TensorInfo, device: str = "cpu", threads: int | None = None,
                piece_bytes: int | None = None, flag: str = "--model_dir") -> torch.Tensor:
    """One tensor of a safetensors file by positioned reads of exactly its byte range.

    On the CPU the bytes land straight in the returned tensor; on CUDA they pass through a few
    pinned staging pieces (the caching host allocator reuses them) and are copied to the device
    asynchronously on the current stream, so host memory is a few pieces, not the tensor.
    """
    import torch

    dtype = torch_dtype(info.dtype)
    if dtype is None:
        raise HarnessError(f"{flag}: weight file {path} holds {name} as {info.dtype}, a dtype this reader does not "
                           f"support (supported: {', '.join(DTYPES)}); re-save the model in fp32, fp16 or bf16")
    short = (f"{flag}: weight file {path} is truncated (unexpected end of file reading {name}); "
             "copy the whole checkpoint again")
    if info.nbytes != math.prod(info.shape) * ITEMSIZE[info.dtype]:
        raise HarnessError(f"{flag}: weight file {path} gives {name} {info.nbytes} bytes for a {info.dtype} tensor of "
                           f"shape {list(info.shape)}; re-save the model")
    dev = torch.device(device)
    fd = os.open(path, os.O_RDONLY)
    try:
        if dev.type != "cuda":
            out = torch.empty(info.shape, dtype=dtype)
            view = byte_view(out)
            if info.nbytes <= PIECE_MIN:
                pread_exact(fd, view, info.offset, short)
            else:
                with ParallelReader(min(threads or read_threads(), -(-info.nbytes // PIECE_MIN)),
                                    piece_bytes) as reader:
                    for f in reader.submit(fd, view, info.offset, short):
                        f.result()
            return out if dev.type == "cpu" else out.to(dev)
        return _read_to_cuda(fd, info, dtype, dev, short, threads, piece_bytes)
    finally:
        os.close(fd)


def _read_to_cuda(fd, info: TensorInfo, dtype, dev, short: str, threads, piece_bytes) -> torch.Tensor:
    import torch

    out = torch.empty(info.shape, dtype=dtype, device=dev)
    flat = out.view(-1).view(torch.uint8) if out.numel() else None
    if flat is None:
        return out
    threads = threads or read_threads()
    step = piece_bytes or STAGING_PIECE
    ranges = pieces(info.nbytes, step)
    nslots = min(len(ranges), STAGING_SLOTS)
    staging = [torch.empty(min(step, info.nbytes), dtype=torch.uint8, pin_memory=True) for _ in range(nslots)]
    events: list = [None] * nslots
    stream = torch.cuda.current_stream(dev)
    from collections import deque

    with ParallelReader(min(threads, nslots)) as reader:
        queue = deque()
        for j, (b, e) in enumerate(ranges):
            slot = j % nslots
            if len(queue) == nslots:  # the slot's previous piece: copy it out before reading again
                _copy_out(queue.popleft(), staging, events, flat, stream)
            event = events[slot]
            view = byte_view(staging[slot])[: e - b]
            queue.append((reader.submit(fd, view, info.offset + b, short,
                                        before=event.synchronize if event is not None else None,
                                        piece_bytes=e - b)[0], slot, b, e))
        while queue:
            _copy_out(queue.popleft(), staging, events, flat, stream)
    return out


def _copy_out(item, staging, events, flat, stream) -> None:
    import torch

    future, slot, b, e = item
    future.result()
    flat[b:e].copy_(staging[slot][: e - b], non_blocking=True)
    events[slot] = torch.cuda.Event()
    events[slot].record(stream)
