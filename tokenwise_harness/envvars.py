"""The numeric TOKENWISE_* environment settings, read and checked in one place.

A value that is set but unusable (`TOKENWISE_READ_THREADS=eight`) is bad input like a bad flag:
a one-line HarnessError naming the variable and what it takes, never a traceback and never a
silent fallback to the default. run.EvalSpec.validate checks them all before anything runs.
"""

from __future__ import annotations

import os

from tokenwise_harness.errors import HarnessError

# name -> (lowest, highest or None) accepted; the defaults live where each is used
INT_SETTINGS = {
    "TOKENWISE_READ_THREADS": (1, None),  # reader threads per read (safetensors_io)
    "TOKENWISE_STREAM_SLOTS": (1, 2),  # chunks of pinned host memory per cache (host_arena)
    "TOKENWISE_LOWRANK_STORE_BYTES": (0, None),  # the low-rank factor store's cap (memo)
}


def int_setting(name: str, default: int) -> int:
    """The integer in environment variable `name` (unset or empty: `default`)."""
    low, high = INT_SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise HarnessError(f"environment variable {name}={text!r} is not {span}; fix or unset it")
    return value


def check_settings() -> None:
    """Refuse any unusable numeric TOKENWISE_* setting now (one line), not mid-run."""
    for name in INT_SETTINGS:
        int_setting(name, 0)
