"""Progress of long session-level steps (capturing a cache) on pytest's terminal.

pytest captures sys.stdout/stderr around tests, and a bar drawn before the header would be
lost in CI logs: the bar is drawn through the terminal reporter (the writer pytest's own output
uses), only when it is a TTY and the run is not `-q -q`; plain log lines are written unless
`-q -q`, so a CI log shows what took the time.
"""

from __future__ import annotations


class TerminalStream:
    """A file-like object for tqdm that writes through pytest's terminal reporter."""

    def __init__(self, tr):
        self._tr = tr

    def write(self, text: str) -> int:
        self._tr.write(text, flush=True)
        return len(text)

    def flush(self) -> None:
        self._tr.flush()

    def isatty(self) -> bool:
        return True


def _quiet(config) -> bool:
    return config.getoption("verbose") < -1  # -q -q


def progress_stream(config):
    """Where a tqdm bar goes (a TerminalStream), or False: not a TTY, -q -q, or no terminal."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if _quiet(config) or tr is None or not tr.isatty():
        return False
    return TerminalStream(tr)


def log_line(config):
    """A log(msg) function: one `tokenwise: msg` line on pytest's terminal (nothing under -q -q)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if _quiet(config) or tr is None:
        return lambda msg: None

    def log(msg: str) -> None:
        tr.write_line(f"tokenwise: {msg}")
        tr.flush()

    return log
