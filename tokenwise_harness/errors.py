"""The one user-facing error type.

Anything raised as HarnessError is bad input that the user can fix: the CLI prints its
message on one line and exits with code 2, the pytest plugin turns it into a usage error.
Messages name the file or flag at fault and say what to do.
"""


class HarnessError(Exception):
    """Bad input: one line naming the file or flag and what to do."""

    exit_code = 2


def did_you_mean(word: str, choices, normalize=None) -> str:
    """'; did you mean X?' with the closest of `choices` (difflib), or '' when none is close."""
    import difflib

    norm = normalize or (lambda c: c.lower())
    by_key: dict[str, str] = {}
    for c in choices:
        by_key.setdefault(norm(c), c)
    close = difflib.get_close_matches(norm(word), list(by_key), n=1, cutoff=0.6)
    return f"; did you mean {by_key[close[0]]}?" if close else ""
