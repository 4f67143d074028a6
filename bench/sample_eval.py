"""Where a tokenwise-precision process spends its wall time, thread by thread: a stack sampler.

    python bench/sample_eval.py --out FILE [--every_ms 2] -- eval_fake --model_dir=M --xy_path=C ...

cProfile (profile_eval.py) sees only the main thread and counts CPU calls, not waits. This runs
cli.main in this process with a thread that samples every thread's Python stack (sys._current_frames)
every few milliseconds and writes:
  * the main thread's timeline: runs of consecutive samples in one (innermost harness frame,
    leaf frame), from the process's own start (imports included);
  * gaps: stretches where no sample came at all (something held the GIL without releasing it);
  * per thread kind: samples busy (not parked in a lock, queue or sleep) by leaf frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter, defaultdict

T0 = time.perf_counter()
WAITS = {"wait", "_wait_for_tstate_lock", "acquire", "get", "sleep", "select", "poll", "result", "join",
         "_worker", "wait_for", "epoll"}


MILESTONES = ("cli.py:cmd_eval", "run.py:run_eval", "engine.py:evaluate_plan", "engine.py:score_group",
              "document.py:write_report")


def _where(frame):
    """(innermost tokenwise_harness frame, leaf frame) of one stack, as 'file:function', and the
    milestones (MILESTONES) on the stack."""
    leaf = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
    own, marks = None, set()
    f = frame
    while f is not None:
        if "tokenwise_harness" in f.f_code.co_filename:
            here = f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}"
            own = own or f"{f.f_code.co_filename.split('tokenwise_harness')[-1].lstrip('/')}:{f.f_code.co_name}"
            if here in MILESTONES:
                marks.add(here)
        f = f.f_back
    return own or "-", leaf, frozenset(marks)


def _sample(stop: threading.Event, every: float, samples: list) -> None:
    me = threading.get_ident()
    while not stop.is_set():
        t = time.perf_counter() - T0
        names = {th.ident: th.name for th in threading.enumerate()}
        row = {}
        for tid, frame in sys._current_frames().items():
            if tid != me:
                row[names.get(tid, str(tid))] = _where(frame)
        samples.append((t, row))
        time.sleep(every)


def _kind(name: str) -> str:
    return name.rstrip("0123456789_-").split("_")[0] if name != "MainThread" else name


def write(out: str, samples: list, every: float, wall: float, rc) -> None:
    lines = [f"rc {rc}; {wall:.3f} s from this script's start to cli.main's return; {len(samples)} samples, "
             f"every {every * 1e3:.0f} ms", "", "== main thread milestones (first and last sample inside)"]
    for mark in MILESTONES:
        inside = [t for t, row in samples if mark in row.get("MainThread", ("", "", frozenset()))[2]]
        if inside:
            lines.append(f"{inside[0]:7.3f} {inside[-1]:7.3f}  {mark}")
    lines += ["", "== main thread timeline (runs >= 15 ms)"]
    runs, prev, start = [], None, 0.0
    for t, row in samples:
        cur = row.get("MainThread", (None, None, None))[:2]
        if cur != prev:
            if prev is not None:
                runs.append((start, t, prev))
            prev, start = cur, t
    if prev is not None:
        runs.append((start, samples[-1][0], prev))
    for a, b, (own, leaf) in runs:
        if b - a >= 0.015:
            lines.append(f"{a:7.3f} {b:7.3f} {b - a:6.3f}  {own:45s} {leaf}")
    lines += ["", "== gaps > 20 ms (no sample: the GIL was held)"]
    for (t1, _), (t2, row) in zip(samples, samples[1:]):
        if t2 - t1 > every + 0.02:
            lines.append(f"{t1:7.3f} {t2:7.3f} {t2 - t1:6.3f}  main then: {row.get('MainThread', ())[:2]}")
    lines += ["", "== busy samples by thread kind and leaf (x every ms)"]
    busy: dict[str, Counter] = defaultdict(Counter)
    for _, row in samples:
        for name, (own, leaf, _) in row.items():
            if leaf.split(":")[-1] not in WAITS:
                busy[_kind(name)][f"{own} | {leaf}"] += 1
    for kind, counter in sorted(busy.items()):
        lines.append(f"-- {kind}: {sum(counter.values())} busy samples")
        lines += [f"   {n:5d}  {what}" for what, n in counter.most_common(12)]
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> int:
    cut = sys.argv.index("--")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--every_ms", type=float, default=2.0)
    mine = p.parse_args(sys.argv[1:cut])
    every = mine.every_ms / 1e3
    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=_sample, args=(stop, every, samples), name="sampler", daemon=True)
    th.start()
    from tokenwise_harness import cli

    rc = cli.main(sys.argv[cut + 1:])
    wall = time.perf_counter() - T0
    stop.set()
    th.join()
    write(mine.out, samples, every, wall, rc)
    return rc or 0


if __name__ == "__main__":
    raise SystemExit(main())
