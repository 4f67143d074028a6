"""pytest-xdist support: one input group's cases per worker, one GPU per worker, and the
transport of each case's result from the worker that ran it to the controller.

An input group is every case of the weights that read one cached X (cache.CacheEntry.x_key):
q/k/v share one and gate/up another (the seed layout stores it per weight, under one checksum
the cache reads once), o and down have their own. A worker running a whole group reads that X once for all of its weights.

xdist is optional: nothing here imports it until a scheduler is asked for.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest

from tokenwise_harness.verdict.cases import Case, parse_case_id

if TYPE_CHECKING:
    from tokenwise_harness.cache import XYCache

# Name of the user property that carries a case's payload (JSON) on its test report: xdist
# sends reports, user_properties included, from the workers to the controller.
PROP = "tokenwise_case"
NODEID_PREFIX = "tokenwise::"
CACHE_ROOT = "tokenwise_cache_root"  # workerinput key: the controller's resolved cache root
_DIST_FLAGS = ("--dist", "-d", "--distload")


def is_worker(config: pytest.Config) -> bool:
    """Whether this process is an xdist worker (xdist documents `config.workerinput` for that)."""
    return hasattr(config, "workerinput")


def to_worker(node: object, key: str, value: str) -> None:
    """Hand a value to an xdist worker being started (pytest_configure_node: its `workerinput`)."""
    node.workerinput[key] = value


def from_controller(config: pytest.Config, key: str) -> str | None:
    """On an xdist worker, the value the controller handed it (to_worker); else None."""
    return getattr(config, "workerinput", {}).get(key)


def worker_device(config: pytest.Config, device: str) -> str:
    """'cuda' on an xdist worker -> 'cuda:N': one GPU per worker, by worker index
    (CUDA_VISIBLE_DEVICES already applied)."""
    worker = getattr(config, "workerinput", {}).get("workerid", "")
    if device != "cuda" or not worker.startswith("gw"):
        return device
    import torch

    return f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"


def group_name(case: Case, cache: XYCache) -> str:
    """The xdist group of a case: the cached X its weight reads (and its variant)."""
    return f"{cache.entry(case.target).x_key}{'-smooth' if case.smooth else ''}"


def input_group(nodeid: str, cache: XYCache) -> str | None:
    """The input group of a tokenwise item's nodeid (`tokenwise::<case id>[@group]`), else None."""
    if not nodeid.startswith(NODEID_PREFIX):
        return None
    case = parse_case_id(nodeid[len(NODEID_PREFIX):].split("@", 1)[0])
    return None if case is None else f"tokenwise:{group_name(case, cache)}"


def make_scheduler(config: pytest.Config, log: object, cache: XYCache) -> object | None:
    """The xdist scheduler under -n: all cases of one input group (the weights reading one
    cached X, each with all its configs) go to one worker.

    Used for `--dist loadgroup` and for plain `-n N` (whose implied `--dist load` would
    spread a group's cases over workers, each redoing decompositions and reading its X);
    an explicit `--dist load|loadscope|...` is respected (None: xdist's own scheduler).
    Groups come from our case ids, not from xdist's `@group` nodeid suffix, which
    pytest 9's structured node ids silently drop (pytest-dev/pytest-xdist#1386).
    """
    dist = config.getoption("dist")
    if dist == "loadgroup" or (dist == "load" and not _dist_given(config)):
        return _scheduler_class()(config, log, cache=cache)
    return None


def _dist_given(config: pytest.Config) -> bool:
    """Whether the user chose an xdist mode (command line, PYTEST_ADDOPTS or ini addopts)."""
    args = [str(a) for a in config.invocation_params.args]
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    args += [str(a) for a in config.getini("addopts")]
    return any(a in _DIST_FLAGS or a.startswith("--dist=") for a in args)


_SCHEDULER = None


def _scheduler_class():
    """xdist's LoadGroupScheduling, grouping tokenwise items by input group (built on first use)."""
    global _SCHEDULER
    if _SCHEDULER is None:
        # xdist has no public way to group items by a key of our own: its documented hook
        # (pytest_xdist_make_scheduler) returns a scheduler, and LoadGroupScheduling's
        # `_split_scope` is the one place that maps a nodeid to its group.
        from xdist.scheduler import LoadGroupScheduling

        class TokenwiseScheduling(LoadGroupScheduling):
            def __init__(self, config: pytest.Config, log: object = None, *, cache: XYCache) -> None:
                super().__init__(config, log)
                self.cache = cache  # the controller's: the same cache its workers read

            def _split_scope(self, nodeid: str) -> str:
                group = input_group(nodeid, self.cache)
                return group if group is not None else super()._split_scope(nodeid)

        _SCHEDULER = TokenwiseScheduling
    return _SCHEDULER


def attach(item: pytest.Item, payload: dict, metric_names: Iterable[str]) -> None:
    """Put a case's payload on its report (and one junitxml <property> per metric)."""
    item.user_properties.append((PROP, json.dumps(payload, sort_keys=True, allow_nan=True)))
    for name in metric_names:
        if name in payload["metrics"]:
            item.user_properties.append((name, payload["metrics"][name]))


def received(report: pytest.TestReport) -> dict | None:
    """The case payload a call-phase report carries (on the controller, from any worker), else None."""
    if report.when != "call":
        return None
    for name, value in report.user_properties:
        if name == PROP:
            return json.loads(value)
    return None
