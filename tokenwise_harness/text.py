"""Small wording helpers for user-facing messages."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 config', '2 configs' (many: an irregular plural)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
