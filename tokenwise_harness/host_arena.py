"""One page-locked host arena per X/Y cache: where every CUDA stream over it stages its chunks.

XYCache.stream on CUDA reads each chunk of each key into page-locked host memory and copies it
to the device asynchronously. Pinned buffers
taken per stream from torch (`pin_memory=True`) go through its caching host allocator, which
rounds every block up to a power of two and keeps every block it has ever made: host memory
grew to the sum of every stream's sizes (q/k/v, o, gate/up, down ...). Instead the cache holds
one arena: one contiguous block of equal slots (one; two, alternating, with
TOKENWISE_STREAM_SLOTS=2),
carved into one aligned view per key for each stream. It is sized once for the widest stream a
run will open (XYCache.reserve_for, called by the engine with its plan), allocated at the first
CUDA stream with that exact size (plain host memory page-locked with cudaHostRegister: no
rounding, nothing cached), grows only when a wider stream comes than was reserved (the old
block is unregistered and freed first), and is released by XYCache.close() or when the cache
is collected.

Each slot remembers, per key, the CUDA event recorded after that key's last copy out of it; a
read into a key's view first waits for that event, and a new stream's carve waits for all of
them, so host memory is never overwritten while a copy from it is in flight, across streams as
within one.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from tokenwise_harness.envvars import int_setting
from tokenwise_harness.errors import HarnessError

if TYPE_CHECKING:
    import torch

ALIGN = 4096  # every key's view, and each slot, starts on a page boundary
SLOTS_ENV = "TOKENWISE_STREAM_SLOTS"


def stream_slots() -> int:
    """Slots of a cache's arena: 1 by default (one chunk of the widest stream: each key's next
    rows wait for the copy of its current rows, which is queued as soon as they land), or 2 with
    TOKENWISE_STREAM_SLOTS=2 (chunk i+1 is read while chunk i's copies are still queued behind
    the caller's work on chunk i-1). On the H200 one slot was the faster of the two in both
    measurements of the 4-layer warm eval (4.34 vs 4.72 s, 5.0 vs 5.28 s) and holds 0.22 GiB less."""
    return int_setting(SLOTS_ENV, 1)


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def layout(sizes: list[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets of byte ranges of `sizes` laid end to end, each starting `align`-aligned; and the
    bytes they span together (a multiple of `align`)."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += align_up(n, align)
    return offsets, end


class _Block:
    """One host allocation of `nbytes` usable bytes from an ALIGN-aligned base, split into
    `slots` equal slots, page-locked when `pin`; free() waits for the copies out of it,
    unregisters it and drops it (once)."""

    def __init__(self, nbytes: int, slots: int, pin: bool):
        import torch

        self.nbytes, self.pinned = nbytes, False
        # per slot: key -> the CUDA event recorded after that key's last copy out of the slot
        self.events: list[dict] = [{} for _ in range(slots)]
        self.memory = torch.empty(nbytes + ALIGN, dtype=torch.uint8)  # plain host memory, exact size
        self.base = -self.memory.data_ptr() % ALIGN
        if pin and nbytes:
            err = int(torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, 1))  # 1: cudaHostRegisterPortable
            if err != 0:
                self.memory = None
                raise HarnessError(f"could not page-lock {nbytes} bytes of host memory for streaming the X/Y cache "
                                   f"(cudaHostRegister: cudaError {err}); free host memory or lower the chunk size "
                                   "(--chunk_tokens N / --chunk-tokens=N)")
            self.pinned = True

    @property
    def ptr(self) -> int:
        return self.memory.data_ptr() + self.base

    def wait_all(self, slot: int) -> None:
        for event in self.events[slot].values():
            event.synchronize()
        self.events[slot].clear()

    def free(self) -> None:
        if self.memory is None:
            return
        for slot in range(len(self.events)):
            self.wait_all(slot)
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.ptr)
            self.pinned = False
        self.memory = None


class HostArena:
    """`slots` slots of one contiguous host block, carved into per-key views for one stream at a time.

    `reserve(slot_bytes)` asks for at least that much per slot before anything is allocated;
    `carve(slot, specs)` returns a view per key (spec: key, shape, dtype) of that slot, each
    ALIGN-aligned, allocating the block at the first call (max of what was reserved and what is
    needed) and replacing it by an exactly wide enough one when a stream needs more.
    `allocations` counts the blocks made; `slot_bytes` is the current block's slot size.
    Copies out of a slot are tracked per key: `record(slot, key)` after a key's copy is queued,
    `last_copy(slot, key)` the event a read into that key's view must wait for.
    """

    def __init__(self, pin: bool = True, slots: int = 2):
        self.pin, self.slots = pin, slots
        self.reserved = 0
        self.allocations = 0
        self.busy = False  # a stream is reading into it (XYCache.stream gives a second one its own)
        self._release_after = False  # released while busy: free at the stream's end
        self._block: _Block | None = None
        self._free = None  # the current block's finalizer: frees it when called or when the arena is collected

    @property
    def slot_bytes(self) -> int:
        return self._block.nbytes // self.slots if self._block is not None else 0

    @property
    def nbytes(self) -> int:
        """Host bytes the arena holds now (every slot)."""
        return self._block.nbytes if self._block is not None else 0

    def reserve(self, slot_bytes: int) -> None:
        self.reserved = max(self.reserved, align_up(slot_bytes))

    def ensure(self, slot_bytes: int) -> None:
        """Allocate the block, or replace it by a wider one, so each slot holds `slot_bytes`."""
        slot_bytes = align_up(slot_bytes)
        if self._block is not None and slot_bytes <= self.slot_bytes:
            return
        self._drop()  # the old block first: never both at once
        width = max(slot_bytes, self.reserved)
        block = _Block(self.slots * width, self.slots, self.pin)
        self._block, self._free = block, weakref.finalize(self, block.free)
        self._free.atexit = False  # at interpreter exit the process's memory goes anyway
        self.allocations += 1

    def carve(self, slot: int, specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """{key: a view of `slot` with that shape and dtype}: disjoint, ALIGN-aligned ranges.

        For a new stream: its views may lie over other keys of the last one, so every copy still
        queued out of the slot is waited for first (long done, in practice)."""
        sizes = [_numel(shape) * dtype.itemsize for _, shape, dtype in specs]
        offsets, span = layout(sizes)
        self.ensure(span)
        block = self._block
        block.wait_all(slot)
        at = block.base + slot * self.slot_bytes
        return {key: block.memory[at + off: at + off + n].view(dtype).view(shape)
                for (key, shape, dtype), off, n in zip(specs, offsets, sizes)}

    def last_copy(self, slot: int, key: str):
        """The CUDA event after the last queued copy of `key` out of `slot` (None: nothing queued)."""
        return self._block.events[slot].get(key) if self._block is not None else None

    def record(self, slot: int, key: str, stream=None) -> None:
        """Record, on `stream` (the CUDA stream the copy was queued on; default: the current one),
        that `key`'s copy out of `slot` has been queued."""
        import torch

        event = torch.cuda.Event()
        event.record(stream)
        self._block.events[slot][key] = event

    def acquire(self) -> bool:
        """Take the arena for one stream; False when another stream holds it."""
        if self.busy:
            return False
        self.busy = True
        return True

    def done(self) -> None:
        """The stream that acquired it has ended (a release asked for meanwhile happens now)."""
        self.busy = False
        if self._release_after:
            self.release()

    def release(self) -> None:
        """Free the block now (after the copies out of it finish); the next carve allocates again.
        While a stream holds the arena, the block is freed when that stream ends."""
        if self.busy:
            self._release_after = True
            return
        self._drop()

    def _drop(self) -> None:
        self._release_after = False
        if self._free is not None:
            self._free()
        self._block, self._free = None, None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
