"""One test case: an allowlisted projection scored under one grid config.

The case id is the harness's own key for a case everywhere (thresholds, baselines, the JSON
report, pytest's -k): `layer0-self_attn-q_proj-rank16-nvfp4-blk128`, plus `-smooth` for a
case scored on the SmoothQuant-smoothed model. pytest's nodeid is never used as a key:
xdist's `--dist loadgroup` appends `@group` to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenwise_harness.allowlist import ALLOWED, PROJ_ORDER, Target
from tokenwise_harness.grid import SvdqConfig

# Inverse of Case.case_id. Format names are [a-z0-9_] (no '-'), so the words split cleanly.
_BLK = r"\d+|in|none"
_ID_RE = re.compile(
    rf"^layer(?P<layer>\d+)-(?P<block>mlp|self_attn)-(?P<proj>[a-z_]+)"
    rf"-rank(?P<rank>\d+)-(?P<fmt>[a-z0-9_]+)-blk(?P<blk>{_BLK})"
    rf"(?:-a(?P<afmt>[a-z0-9_]+)-ablk(?P<ablk>{_BLK}))?"
    rf"(?:-iters(?P<iters>\d+))?(?P<smooth>-smooth)?$"
)


@dataclass(frozen=True)
class Case:
    layer: int
    block: str
    proj: str
    cfg: SvdqConfig
    smooth: bool = False

    def __post_init__(self):
        # Only allowlisted projections become cases; this also keeps ids safe as file names.
        if (self.block, self.proj) not in ALLOWED:
            raise ValueError(f"{self.block}.{self.proj} is not an allowlisted projection")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer {self.layer!r} is not a non-negative integer")

    @property
    def case_id(self) -> str:
        words = f"layer{self.layer}-{self.block}-{self.proj}-{self.cfg.id_words}"
        return words + "-smooth" if self.smooth else words

    @property
    def target(self) -> Target:
        return Target(self.layer, self.block, self.proj)

    @property
    def module_path(self) -> str:
        return self.target.path

    def sort_key(self) -> tuple:
        """Layer, then projection in forward order, then config, plain before smoothed."""
        return (self.layer, PROJ_ORDER.index(self.proj), self.cfg.sort_key(), self.smooth)


def parse_case_id(case_id: str) -> Case | None:
    """The Case a case id names, or None when it is not one (e.g. a hand-edited baseline)."""
    m = _ID_RE.match(case_id)
    if not m or (m["block"], m["proj"]) not in ALLOWED:
        return None
    cfg = SvdqConfig(
        rank=int(m["rank"]),
        fmt=m["fmt"],
        blk=_blk(m["blk"]),
        afmt=m["afmt"],
        ablk=_blk(m["ablk"]) if m["afmt"] else None,
        iters=int(m["iters"] or 1),
    )
    case = Case(int(m["layer"]), m["block"], m["proj"], cfg, smooth=bool(m["smooth"]))
    # Non-canonical spellings ("layer01", "iters1") would name a case that never runs.
    return case if case.case_id == case_id else None


def _blk(text: str) -> int | str | None:
    if text == "none":
        return None
    return "in" if text == "in" else int(text)
