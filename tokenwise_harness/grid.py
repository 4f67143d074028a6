"""Grid parsing: ranks, qspecs, grid modes, and config keys.

A config key is the seed's string `rank=16;fmt=nvfp4;blk=128`. Rank-only configs carry
`fmt=none;blk=none`; quant-only configs carry `rank=0`. Optional suffixes (`;afmt=..;ablk=..`
for activation quantization, `;iters=N` for an iterated low-rank branch) appear only when
set, so weight-only one-shot reports keep the seed's keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenwise_harness.errors import HarnessError, did_you_mean

GRID_MODES = ("combined", "full")


@dataclass(frozen=True)
class QSpec:
    fmt: str
    blk: int | str  # positive int or "in"

    @property
    def text(self) -> str:
        return f"{self.fmt}@{self.blk}"


@dataclass(frozen=True)
class SvdqConfig:
    """One point of the grid: rank of the low-rank branch plus the residual's format/block."""

    rank: int
    fmt: str = "none"  # "none": rank-only, the residual is dropped
    blk: int | str | None = None
    afmt: str | None = None  # activation format (W4A4), None = weights only
    ablk: int | str | None = None
    iters: int = 1  # low-rank refinement iterations, 1 = one-shot SVD

    @property
    def quantized(self) -> bool:
        return self.fmt != "none"

    @property
    def key(self) -> str:
        blk = "none" if self.blk is None else self.blk
        key = f"rank={self.rank};fmt={self.fmt};blk={blk}"
        if self.afmt is not None:
            key += f";afmt={self.afmt};ablk={self.ablk}"
        if self.iters > 1:
            key += f";iters={self.iters}"
        return key

    @property
    def id_words(self) -> str:
        """-k friendly id fragment: rank16-nvfp4-blk128 (rank-only: rank16-none-blknone)."""
        blk = "none" if self.blk is None else self.blk
        words = f"rank{self.rank}-{self.fmt}-blk{blk}"
        if self.afmt is not None:
            words += f"-a{self.afmt}-ablk{self.ablk}"
        if self.iters > 1:
            words += f"-iters{self.iters}"
        return words

    def sort_key(self) -> tuple:
        return (self.rank, self.fmt, str(self.blk), str(self.afmt), str(self.ablk), self.iters)


def parse_key(key: str) -> SvdqConfig:
    """Inverse of SvdqConfig.key."""
    try:
        fields = dict(part.split("=", 1) for part in key.split(";"))
        blk = _parse_blk_value(fields["blk"])
        ablk = _parse_blk_value(fields["ablk"]) if "ablk" in fields else None
        return SvdqConfig(
            rank=int(fields["rank"]),
            fmt=fields["fmt"],
            blk=blk,
            afmt=fields.get("afmt"),
            ablk=ablk,
            iters=int(fields.get("iters", 1)),
        )
    except (KeyError, ValueError) as exc:
        raise HarnessError(f"config key {key!r} is malformed: expected like 'rank=16;fmt=nvfp4;blk=128'") from exc


def _parse_blk_value(text: str) -> int | str | None:
    if text == "none":
        return None
    if text == "in":
        return "in"
    return int(text)


def parse_ranks(text: str, flag: str = "--ranks") -> list[int]:
    """'8,16,32' -> [8, 16, 32]; sorted, deduplicated, each >= 0."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise HarnessError(f"{flag} is empty: give comma-separated ranks like 8,16,32")
    ranks = []
    for part in parts:
        try:
            rank = int(part)
        except ValueError:
            raise HarnessError(f"{flag}: {part!r} is not an integer rank; give e.g. 8,16,32") from None
        if rank < 0:
            raise HarnessError(f"{flag}: rank {rank} is negative; ranks are >= 0")
        ranks.append(rank)
    return sorted(set(ranks))


def parse_qspec(text: str, flag: str = "--qspecs") -> QSpec:
    """'nvfp4@128' -> QSpec('nvfp4', 128); 'fp4@in'; a bare 'nvfp4' takes the format's default block."""
    from tokenwise_harness.numerics import formats

    text = text.strip()
    fmt, sep, blk_text = text.partition("@")
    fmt = fmt.strip().lower()
    if fmt not in formats.FORMATS:
        known = ", ".join(sorted(formats.FORMATS))
        raise HarnessError(f"{flag}: qspec {text!r} has unknown format {fmt!r}{did_you_mean(fmt, formats.FORMATS)} "
                           f"(known formats: {known}; `tokenwise-precision formats` describes them)")
    if not sep:
        return QSpec(fmt, formats.FORMATS[fmt].default_blk)
    blk_text = blk_text.strip()
    if blk_text == "in":
        return QSpec(fmt, "in")
    try:
        blk = int(blk_text)
    except ValueError:
        blk = 0
    if blk <= 0 or str(blk) != blk_text.lstrip("+"):
        raise HarnessError(
            f"{flag}: qspec {text!r} has block {blk_text!r}; a block is a positive integer or 'in'"
        )
    return QSpec(fmt, blk)


def parse_qspecs(text: str, flag: str = "--qspecs") -> list[QSpec]:
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise HarnessError(f"{flag} is empty: give comma-separated fmt@blk specs like nvfp4@128,fp4@in")
    out: list[QSpec] = []
    for part in parts:
        spec = parse_qspec(part, flag)
        if spec not in out:
            out.append(spec)
    return out


def build_grid(
    ranks: Iterable[int],
    qspecs: Iterable[QSpec],
    grid_mode: str = "combined",
    act_qspecs: Iterable[QSpec] | None = None,
    iters: int = 1,
) -> list[SvdqConfig]:
    """The configs of a grid, in a stable order.

    combined: rank x qspec (rank 0 in --ranks gives quant-only configs).
    full: combined plus quant-only (rank=0) per qspec and rank-only (fmt=none) per rank > 0.
    With activation specs, every quantized config is crossed with every activation spec;
    `full` then adds activation-only rows (rank 0, weights unquantized).
    """
    if grid_mode not in GRID_MODES:
        raise HarnessError(f"--grid_mode {grid_mode!r} is unknown; use one of: {', '.join(GRID_MODES)}")
    ranks = list(ranks)
    qspecs = list(qspecs)
    weight_cfgs: list[SvdqConfig] = []

    def add(cfg: SvdqConfig) -> None:
        if cfg not in weight_cfgs:
            weight_cfgs.append(cfg)

    for rank in ranks:
        for q in qspecs:
            add(SvdqConfig(rank, q.fmt, q.blk, iters=iters if rank > 0 else 1))
    if grid_mode == "full":
        for q in qspecs:
            add(SvdqConfig(0, q.fmt, q.blk))
        for rank in ranks:
            if rank > 0:
                add(SvdqConfig(rank, "none", None, iters=iters))
    act = list(act_qspecs or [])
    if not act:
        return weight_cfgs
    cfgs: list[SvdqConfig] = []
    for cfg in weight_cfgs:
        if not cfg.quantized:
            cfgs.append(cfg)  # rank-only: no residual branch, nothing for Q_a to act on
            continue
        for a in act:
            cfgs.append(SvdqConfig(cfg.rank, cfg.fmt, cfg.blk, a.fmt, a.blk, cfg.iters))
    if grid_mode == "full":
        for a in act:
            cfgs.append(SvdqConfig(0, "none", None, a.fmt, a.blk))
    return cfgs
