"""Atomic file output: write beside the final name, then rename.

An interrupted run (SIGINT, SIGKILL, a full disk) leaves at most a `.tmp-*` file next to
the target, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tokenwise_harness.errors import HarnessError

TMP_PREFIX = ".tmp-"


def check_writable_dir(directory: Path, flag: str, create: bool = True) -> Path:
    """Make sure `directory` exists (creating it when asked) and can be written; else HarnessError."""
    directory = Path(directory)
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"{flag}: cannot create directory {directory}: {exc.strerror}") from None
    if not directory.is_dir():
        raise HarnessError(f"{flag}: directory {directory} does not exist; create it or pick another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise HarnessError(f"{flag}: directory {directory} is not writable; pick a writable path")
    return directory


@contextlib.contextmanager
def atomic_path(final: Path, flag: str = "output") -> Iterator[Path]:
    """Yield a temp path in final's directory; on success rename it over `final`.

    On any exception (KeyboardInterrupt included) the temp file is removed.
    """
    final = Path(final)
    check_writable_dir(final.parent, flag, create=False)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(final: Path, text: str, flag: str = "output") -> None:
    with atomic_path(final, flag) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(final: Path, data: bytes, flag: str = "output") -> None:
    with atomic_path(final, flag) as tmp:
        tmp.write_bytes(data)
