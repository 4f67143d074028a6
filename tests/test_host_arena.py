"""The pinned host arena behind XYCache.stream on CUDA (host_arena.py): one block per cache, carved
into aligned, disjoint per-key views, sized up front from the engine's plan, grown only by a wider
stream and released on close. The carving and sizing run here on plain host memory (pin=False);
the CUDA test streams through the real pinned arena and checks the bytes against safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_safetensors_io import _cache, _same_bits
from tokenwise_harness import engine
from tokenwise_harness.cache import XYCache
from tokenwise_harness.checkpoint import ModelDir
from tokenwise_harness.grid import build_grid, parse_qspecs
from tokenwise_harness.host_arena import ALIGN, SLOTS_ENV, HostArena, layout, stream_slots

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _check_views(views: dict, specs: list) -> None:
    """Right shapes and dtypes, aligned starts, no two views sharing a byte (checked by address
    and by writing a different pattern into each and reading every one back)."""
    assert list(views) == [k for k, _, _ in specs]
    for key, shape, dtype in specs:
        assert views[key].shape == shape and views[key].dtype == dtype and views[key].is_contiguous()
        assert views[key].data_ptr() % ALIGN == 0, key
    spans = sorted(_span(v) for v in views.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    for i, v in enumerate(views.values()):
        v.view(torch.uint8).fill_(i + 1)
    for i, v in enumerate(views.values()):
        assert bool((v.view(torch.uint8) == i + 1).all())


def test_layout_aligns_every_range_and_spans_them_all():
    offsets, span = layout([1, ALIGN, ALIGN + 1, 0, 5])
    assert offsets == [0, ALIGN, 2 * ALIGN, 4 * ALIGN, 4 * ALIGN]
    assert span == 5 * ALIGN


def test_carve_gives_disjoint_aligned_views_of_each_slot():
    arena = HostArena(pin=False)
    specs = [("a", (7, 37), F16), ("b", (7, 13), F32), ("c", (7, 1000), BF16)]
    slots = [arena.carve(slot, specs) for slot in (0, 1)]
    for views in slots:
        _check_views(views, specs)
    both = {f"{slot}{k}": v for slot, views in enumerate(slots) for k, v in views.items()}
    _check_views(both, [(f"{slot}{k}", s, d) for slot in (0, 1) for k, s, d in specs])  # the slots never overlap
    need = layout([7 * 37 * 2, 7 * 13 * 4, 7 * 1000 * 2])[1]
    assert arena.allocations == 1 and arena.slot_bytes == need and arena.nbytes == 2 * need  # exact: no rounding


def test_a_narrower_stream_reuses_the_block_and_a_wider_one_grows_it_once():
    arena = HostArena(pin=False)
    wide = [("x", (64, 512), F16), ("y", (64, 256), F16)]
    narrow = [("x2", (64, 100), F32)]
    first = arena.carve(0, wide)["x"].data_ptr()
    assert arena.carve(1, narrow)["x2"].data_ptr() == first + arena.slot_bytes  # slot 1 of the same block
    assert arena.carve(0, narrow)["x2"].data_ptr() == first
    assert arena.allocations == 1
    wider = [("w", (64, 4096), F32)]
    _check_views(arena.carve(0, wider), wider)
    assert arena.allocations == 2 and arena.slot_bytes == 64 * 4096 * 4
    for specs in (wide, narrow, wider):  # everything fits now: no further allocation
        arena.carve(0, specs), arena.carve(1, specs)
    assert arena.allocations == 2


def test_one_slot_holds_one_chunk_of_the_widest_stream(monkeypatch):
    monkeypatch.setenv(SLOTS_ENV, "2")
    assert stream_slots() == 2
    monkeypatch.delenv(SLOTS_ENV)
    assert stream_slots() == 1  # the default: one chunk of host memory
    arena = HostArena(pin=False, slots=1)
    specs = [("x", (16, 300), F16), ("y", (16, 7), F32)]
    _check_views(arena.carve(0, specs), specs)
    assert arena.nbytes == arena.slot_bytes == layout([16 * 300 * 2, 16 * 7 * 4])[1]
    assert arena.last_copy(0, "x") is None  # nothing copied out yet: a read need not wait


def test_reserve_sizes_the_first_block_so_no_stream_of_the_plan_grows_it():
    arena = HostArena(pin=False)
    arena.reserve(3 * ALIGN + 1)
    arena.reserve(ALIGN)  # a reservation never shrinks
    assert arena.nbytes == 0  # reserving allocates nothing
    arena.carve(0, [("x", (1, 8), F16)])
    assert arena.allocations == 1 and arena.slot_bytes == 4 * ALIGN
    arena.carve(1, [("x", (3, ALIGN // 2), F16), ("y", (1, 1), F16)])  # exactly the reserved 4 pages
    assert arena.allocations == 1


def test_release_frees_the_block_and_waits_for_a_stream_holding_it():
    arena = HostArena(pin=False)
    arena.carve(0, [("x", (8, 8), F32)])
    assert arena.acquire() and not arena.acquire()  # one stream at a time
    arena.release()
    assert arena.nbytes > 0  # in use: freed when the stream ends
    arena.done()
    assert arena.nbytes == 0 and arena.acquire()
    arena.done()
    arena.carve(0, [("x", (8, 8), F32)])  # a later stream allocates again
    assert arena.allocations == 2 and arena.nbytes == 2 * ALIGN


X0, Y0 = "model.layers.0.mlp.down_proj.X", "model.layers.0.mlp.down_proj.Y"
X1, Y1 = "model.layers.0.mlp.up_proj.X", "model.layers.0.mlp.up_proj.Y"
X2, Y2 = "model.layers.1.self_attn.q_proj.X", "model.layers.1.self_attn.q_proj.Y"
SHAPES = {X0: (101, 37), Y0: (101, 13), X1: (101, 300), Y1: (101, 7), X2: (101, 5), Y2: (101, 900)}


def test_cache_sizes_a_stream_and_reserves_for_the_widest_input_group(tmp_path):
    cache = XYCache(_cache(tmp_path, SHAPES))  # fp16: 2 bytes an element
    page = lambda n: -(-n // ALIGN) * ALIGN  # noqa: E731
    assert cache.stream_slot_bytes([X0, None, Y0, X0], 16) == page(16 * 37 * 2) + page(16 * 13 * 2)
    assert cache.stream_slot_bytes([X1], 10_000) == page(101 * 300 * 2)  # the chunk is clamped to the tokens
    cache.reserve_for(cache.targets, 64)
    groups = [(37, 13), (300, 7), (5, 900)]  # seed layout: each weight its own X and Y
    assert cache.arena.reserved == max(page(64 * i * 2) + page(64 * o * 2) for i, o in groups)
    assert cache.arena.nbytes == 0
    for _ in cache.stream([X2, Y2], 64, "cpu"):  # a CPU stream yields tensors of its own: no arena
        pass
    assert cache.arena.nbytes == 0 and cache.arena.allocations == 0


def test_the_engine_reserves_its_widest_input_group_before_streaming(demo_model_dirs, tmp_path):
    """evaluate_plan sizes the arena from its plan (compact layout: q/k/v and gate/up share one X
    and stream no Y); nothing is allocated on the CPU."""
    from tokenwise_harness.capture.save_xy import save_xy

    model = demo_model_dirs["qwen2"]
    path = save_xy(model, tmp_path, "c", cn=3, eu=5, length=25, compact=True, progress=False,
                   log=lambda msg: None)
    cache = XYCache(path)
    chunk = min(37, cache.n_tokens)
    widest = max(-(-chunk * cache.shapes[k][1][1] * 2 // ALIGN) * ALIGN for k in cache.offsets if k.endswith(".X"))
    grid = build_grid([8], parse_qspecs("nvfp4@16"), "combined")
    results = engine.evaluate_grid(cache, engine.CheckpointWeights(ModelDir(model), False), grid, 37, "cpu",
                                   progress=False)
    assert len(results) == len(cache.targets)
    assert cache.arena.reserved == widest and cache.arena.allocations == 0


@pytest.mark.cuda
def test_the_engine_page_locks_the_arena_once_before_the_first_stream(demo_model_dirs, tmp_path):
    """On CUDA the arena is allocated while the first weights are read (prepare_weights'
    while_waiting), at its reserved size, so no stream allocates or grows it."""
    from tokenwise_harness.capture.save_xy import save_xy

    path = save_xy(demo_model_dirs["qwen2"], tmp_path, "c", cn=3, eu=5, length=25, compact=True, progress=False,
                   log=lambda msg: None)
    cache = XYCache(path)
    calls = []
    allocate, stream = cache.allocate_arena, cache.stream
    cache.allocate_arena = lambda device: (calls.append(("allocate", cache.arena.allocations)), allocate(device))[1]
    cache.stream = lambda *a, **k: (calls.append(("stream", cache.arena.allocations)), stream(*a, **k))[1]
    grid = build_grid([8], parse_qspecs("nvfp4@16"), "combined")
    engine.evaluate_grid(cache, engine.CheckpointWeights(ModelDir(demo_model_dirs["qwen2"]), False), grid, 37,
                         "cuda", progress=False)
    assert calls[0] == ("allocate", 0) and calls[1] == ("stream", 1)
    assert {c for c in calls[1:]} == {("stream", 1)}
    assert cache.arena.allocations == 1 and cache.arena.slot_bytes == cache.arena.reserved
    cache.close()


def test_per_weight_streams_reserve_one_x_and_one_y(demo_model_dirs, tmp_path):
    """The model-level path streams weight by weight (X and its own Y): grouped=False reserves
    for the widest such stream, less than an input group's X and all its Ys."""
    from tokenwise_harness.capture.save_xy import save_xy

    cache = XYCache(save_xy(demo_model_dirs["qwen2"], tmp_path, "c", cn=1, eu=1, length=16, progress=False,
                            log=lambda msg: None))  # seed layout: q/k/v (and gate/up) share X by checksum
    page = lambda n: -(-n // ALIGN) * ALIGN  # noqa: E731
    cols = lambda key: cache.shapes[key][1][1]  # noqa: E731
    entries = [cache.entry(t) for t in cache.targets]
    per_weight = max(page(8 * cols(e.x_key) * 2) + page(8 * cols(e.y_key) * 2) for e in entries)
    per_group = max(page(8 * cols(x) * 2) + sum(page(8 * cols(e.y_key) * 2) for e in entries if e.x_key == x)
                    for x in {e.x_key for e in entries})
    assert per_weight < per_group
    cache.reserve_for(cache.targets, 8, grouped=False)
    assert cache.arena.reserved == per_weight
    cache.reserve_for(cache.targets, 8)
    assert cache.arena.reserved == per_group


@pytest.mark.cuda
@pytest.mark.parametrize("slots", [2, 1])
def test_cuda_streams_share_one_pinned_arena_bit_identical_and_the_host_cache_does_not_grow(tmp_path, monkeypatch,
                                                                                            slots):
    monkeypatch.setenv(SLOTS_ENV, str(slots))
    path = _cache(tmp_path, SHAPES)
    ref = load_file(str(path))
    cache = XYCache(path)
    assert cache.arena.slots == slots
    streams = [([X0, None, Y0], 16), ([X1, Y1], 7), ([X2, Y2], 33), ([X2, Y2], 101), ([X0, Y0], 101), ([X2], 5)]
    cache.reserve_for(cache.targets, 33)  # chunks of 33: ([X2, Y2], 101) is wider and grows it, once
    torch.cuda.synchronize()
    stats = getattr(torch.cuda, "host_memory_stats", None)
    host_before = stats().get("allocated_bytes.current", 0) if stats else None
    got = []
    for keys, chunk in streams:
        chunks = []
        for start, end, rows in cache.stream(keys, chunk, "cuda", threads=3, piece_bytes=999):
            assert cache.arena.busy and all(r is None or r.device.type == "cuda" for r in rows)
            # The caller's stream lags behind the copies (as the engine's does), then copies the
            # rows at once: a chunk it saw before its copies finished would show in `early`.
            torch.cuda._sleep(100_000)
            early = [None if r is None else r.clone() for r in rows]
            chunks.append((start, end, rows, early))  # kept on the GPU: a slot overwritten too early would show
        got.append((keys, chunks))
    torch.cuda.synchronize()
    for keys, chunks in got:
        for i, key in enumerate(keys):
            if key is None:
                assert all(rows[i] is None and early[i] is None for _, _, rows, early in chunks)
                continue
            whole = torch.cat([rows[i].cpu() for _, _, rows, _ in chunks])
            assert _same_bits(whole, ref[key]), key
            assert _same_bits(torch.cat([early[i].cpu() for *_, early in chunks]), ref[key]), key
    assert cache._verified == set(SHAPES)  # hashed as they streamed: every checksum matched
    widest = max(cache.stream_slot_bytes(keys, chunk) for keys, chunk in streams)
    assert cache.arena.allocations == 2 and cache.arena.slot_bytes == widest  # grew once, exactly
    assert cache.arena.nbytes == slots * widest
    # Page-locked by cudaHostRegister (which succeeded, or the stream would have raised), so the
    # driver DMAs the copies asynchronously. torch's is_pinned() is not asked: on the H200 machine
    # it answered False for registered memory (it consults torch's own host allocator there).
    assert cache.arena._block.pinned
    if stats:  # torch's caching host allocator took no block for any of these streams
        assert stats().get("allocated_bytes.current", 0) <= host_before
    cache.close()
    assert cache.arena.nbytes == 0 and not cache.arena.busy
