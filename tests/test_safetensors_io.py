"""The positioned-read path (safetensors_io): parallel pieces land where they belong, and the
pread weight reader and the cache's chunk stream agree bit for bit with safetensors' own reader
(load_file / get_tensor, an independent implementation) on awkward sizes and every dtype."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenwise_harness.cache import XYCache
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.errors import HarnessError
from tokenwise_harness.safetensors_io import FormatError, ParallelReader, TensorInfo, read_header, read_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.uint8,
          torch.bool]


def _random(shape, dtype, g):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
    # random bit patterns, so every byte matters (NaN payloads and all), as the stored dtype
    bits = torch.randint(0, 256, (*shape, torch.empty(0, dtype=dtype).element_size()), generator=g,
                         dtype=torch.uint8)
    return bits.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("threads,piece", [(1, None), (4, 7), (3, 4096), (8, 1000)])
def test_parallel_pieces_land_in_place(tmp_path, threads, piece):
    """Pieces not aligned to anything (7 bytes, 1000 bytes), one piece, more pieces than threads."""
    data = bytes(torch.randint(0, 256, (50_001,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8))
    f = tmp_path / "blob"
    f.write_bytes(data)
    import os

    fd = os.open(f, os.O_RDONLY)
    try:
        for offset, length in [(0, 50_001), (13, 33_333), (49_990, 11), (5, 0)]:
            buf = bytearray(length)
            with ParallelReader(threads, piece) as reader:
                for fut in reader.submit(fd, memoryview(buf), offset, "short"):
                    fut.result()
            assert bytes(buf) == data[offset:offset + length]
        with ParallelReader(threads, piece) as reader, pytest.raises(HarnessError, match="short read of blob"):
            for fut in reader.submit(fd, memoryview(bytearray(100)), 49_950, "short read of blob"):
                fut.result()
    finally:
        os.close(fd)


def _model_dir(tmp_path, tensors: dict) -> ModelDir:
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return ModelDir(tmp_path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pread_weight_reader_equals_safetensors_get_tensor(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.0.mlp.up_proj.weight": _random((37, 29), dtype, g),  # odd rows, odd bytes
               "model.layers.0.mlp.up_proj.bias": _random((37,), dtype, g),
               "scalar": _random((), dtype, g), "empty": _random((0, 5), dtype, g),
               "big": _random((301, 1031), dtype, g)}
    mdir = _model_dir(tmp_path, tensors)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as fh:
        for name in tensors:
            ref = fh.get_tensor(name)
            assert _same_bits(mdir.read(name), ref), name
            # the same bytes split into many small pieces on several threads
            info = read_header(path).tensors[name]
            assert _same_bits(read_tensor(path, name, info, threads=5, piece_bytes=333), ref), name
    assert mdir.read("absent") is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pread_weight_reader_to_cuda(tmp_path, dtype):
    g = torch.Generator().manual_seed(2)
    tensors = {"w": _random((513, 1029), dtype, g)}
    _model_dir(tmp_path, tensors)
    path = str(tmp_path / "model.safetensors")
    info = read_header(path).tensors["w"]
    for piece in (None, 4099, 1 << 20):
        got = read_tensor(path, "w", info, "cuda", threads=3, piece_bytes=piece)
        assert got.device.type == "cuda" and _same_bits(got.cpu(), tensors["w"])


def test_weight_reader_errors_name_the_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    mdir = _model_dir(tmp_path, {"model.layers.0.mlp.up_proj.weight": _random((64, 64), torch.float32, g),
                                 "f8": torch.zeros(4, dtype=torch.float8_e4m3fn)})
    shard = tmp_path / "model.safetensors"
    # a dtype this reader does not know (hand-written header entry)
    header = read_header(shard)
    with pytest.raises(HarnessError, match="model.safetensors holds odd as C64") as exc:
        read_tensor(shard, "odd", TensorInfo("C64", (1,), header.tensors["f8"].offset, 8))
    assert "\n" not in str(exc.value)
    # the file cut after the header was read: a short read, one line naming the file
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(HarnessError, match=r"model.safetensors is truncated") as exc:
        mdir.read("model.layers.0.mlp.up_proj.weight")
    assert "\n" not in str(exc.value)
    # and a fresh ModelDir refuses the truncated shard up front
    with pytest.raises(HarnessError, match=r"--model_dir: weight file .*model.safetensors is truncated"):
        ModelDir(tmp_path)


def test_header_parser_refusals(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x05")
    with pytest.raises(FormatError, match="8-byte"):
        read_header(f)
    body = json.dumps({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + bytes(16))
    with pytest.raises(FormatError) as exc:
        read_header(f)
    assert exc.value.kind == "entry" and exc.value.tensor == "t"
    body = json.dumps({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + bytes(15))
    with pytest.raises(FormatError) as exc:
        read_header(f)
    assert exc.value.kind == "truncated"


def _cache(tmp_path, shapes: dict, dtype=torch.float16):
    """A cache file as save_xy writes it (checksums included), of the given [N, dim] shapes."""
    import hashlib

    g = torch.Generator().manual_seed(3)
    tensors = {k: _random(s, dtype, g) for k, s in shapes.items()}
    sums = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}
    n = next(iter(shapes.values()))[0]
    meta = {"seed": "0", "cn": "1", "eu": "1", "length": str(n), "save_dtype": "fp16", "format_version": "1",
            "n_tokens": str(n), "checksums": json.dumps(sums, sort_keys=True)}
    path = tmp_path / "xy.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


X, Y = "model.layers.0.mlp.down_proj.X", "model.layers.0.mlp.down_proj.Y"


@pytest.mark.parametrize("chunk,threads,piece", [
    (7, 4, 50),        # pieces split rows (row = 2*37 bytes), several per chunk
    (64, 3, 10_000),   # a chunk smaller than one piece
    (1000, 2, 999),    # one chunk for all rows (clamped to N), pieces not aligned to rows
    (5, 1, None),      # one thread, the default piece size
])
def test_chunk_stream_equals_safetensors_load_file(tmp_path, chunk, threads, piece):
    path = _cache(tmp_path, {X: (101, 37), Y: (101, 13)})
    ref = load_file(str(path))
    cache = XYCache(path)
    got = {X: [], Y: []}
    for start, end, (x, none, y) in cache.stream([X, None, Y], chunk, "cpu", threads=threads, piece_bytes=piece):
        assert none is None and x.shape[0] == y.shape[0] == end - start <= chunk
        got[X].append(x)
        got[Y].append(y)
    for key in (X, Y):
        assert _same_bits(torch.cat(got[key]), ref[key]), key
    assert cache._verified == {X, Y}  # hashed in file order, piece by piece: the checksums matched


def test_chunk_stream_flags_a_flipped_byte_and_a_short_file(tmp_path):
    path = _cache(tmp_path, {X: (64, 40), Y: (64, 8)})
    info = read_header(path).tensors[X]
    data = bytearray(path.read_bytes())
    data[info.offset + 3 * 80 + 41] ^= 0x10  # inside a piece, away from any boundary
    path.write_bytes(bytes(data))
    with pytest.raises(HarnessError, match=f"tensor {X} fails its checksum"):
        for _ in XYCache(path).stream([X, Y], 16, "cpu", threads=4, piece_bytes=100):
            pass
    path = _cache(tmp_path, {X: (64, 40), Y: (64, 8)})
    cache = XYCache(path)  # the header is validated while the file is whole...
    with open(path, "r+b") as fh:  # ...then the file is cut short under the reader
        fh.truncate(path.stat().st_size - 300)
    with pytest.raises(HarnessError, match="unexpected end of file reading") as exc:
        for _ in cache.stream([X, Y], 16, "cpu", threads=4, piece_bytes=100):
            pass
    assert "\n" not in str(exc.value)
