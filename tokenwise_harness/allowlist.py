"""The strict allowlist of projections the harness touches (seed §0.2).

A module is a target when its path matches MODULE_RE *and* (block, projection) is one of
ALLOWED. Everything else (embed_tokens, lm_head, extra linears) is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.(mlp|self_attn)\.([A-Za-z0-9_]+)$")

ALLOWED = frozenset(
    [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    + [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
)

# Projections that read the same input activation: they share one X (and one smooth factor).
SHARED_INPUT = {
    ("self_attn", "q_proj"): "qkv",
    ("self_attn", "k_proj"): "qkv",
    ("self_attn", "v_proj"): "qkv",
    ("self_attn", "o_proj"): "o",
    ("mlp", "gate_proj"): "gate_up",
    ("mlp", "up_proj"): "gate_up",
    ("mlp", "down_proj"): "down",
}

# Stable order of projections inside a layer (forward order).
PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, order=True)
class Target:
    """One allowlisted projection: model.layers.{layer}.{block}.{proj}."""

    layer: int
    block: str
    proj: str

    @property
    def path(self) -> str:
        return f"model.layers.{self.layer}.{self.block}.{self.proj}"

    @property
    def input_group(self) -> str:
        """Name of the activation this projection reads, shared with its siblings."""
        return f"model.layers.{self.layer}.{self.block}.{SHARED_INPUT[(self.block, self.proj)]}"

    def sort_key(self) -> tuple[int, int]:
        return (self.layer, PROJ_ORDER.index(self.proj))


def parse_target(module_path: str) -> Target | None:
    """The Target for an allowlisted module path, else None."""
    m = MODULE_RE.match(module_path)
    if not m:
        return None
    layer, block, proj = int(m.group(1)), m.group(2), m.group(3)
    if (block, proj) not in ALLOWED:
        return None
    return Target(layer, block, proj)


def iter_allowed_linears(model) -> Iterator[tuple[Target, "object"]]:
    """Yield (target, module) for every allowlisted nn.Linear of a model, in forward order."""
    import torch.nn as nn

    found = []
    for name, module in model.named_modules():
        target = parse_target(name)
        if target is not None and isinstance(module, nn.Linear):
            found.append((target, module))
    found.sort(key=lambda tm: tm[0].sort_key())
    yield from found
