"""Atomic file output: write beside the final name, then rename.

An interrupted run (SIGINT, SIGKILL, a full disk) leaves at most a `.tmp-*` file next to
the target, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenwise_harness.errors import HarnessError

TMP_PREFIX = ".tmp-"
# Errors of the output side (a full disk, a read-only mount) become one-line HarnessErrors.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

# (what, path) pairs: `what` is the flag that gave the path ("--xy_path") or a phrase
# ("the current directory"); a None path is skipped.
Inputs = Iterable[tuple[str, "Path | str | None"]]


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
    # os.access says yes to root almost everywhere (/sys, /proc, read-only mounts): only
    # creating a file tells whether the output can be written.
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=directory)
    except OSError as exc:
        raise HarnessError(f"{flag}: directory {directory} is not writable ({exc.strerror}); "
                           "pick a writable path") from None
    os.close(fd)
    os.unlink(probe)
    return directory


def check_output_file(path: Path, flag: str, inputs: Inputs = (), stores: Inputs = (), create: bool = True) -> Path:
    """Fail early (before any heavy work) when `path` cannot become an output file.

    `inputs` / `stores`: see check_not_input (an output never lands on the run's inputs).
    create=False leaves a missing directory to be made when the file is written (pytest writes
    its artifacts at session end): its nearest existing ancestor must then be writable.
    """
    path = Path(path)
    check_not_input(path, flag, inputs, stores)
    if create:
        check_writable_dir(path.parent, flag, create=True)
    else:
        _check_creatable(path.parent, flag)
    if path.is_dir():
        raise HarnessError(f"{flag}: {path} is a directory; give a file path")
    return path


def _check_creatable(directory: Path, flag: str) -> None:
    """HarnessError unless `directory` exists writable, or could be created (without creating it)."""
    parent = directory.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HarnessError(f"{flag}: {parent} is not a directory, so {directory} cannot be created")
    check_writable_dir(parent, flag, create=False)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_identities(directory: Path) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the files directly inside `directory` (a model dir's weights, config...)."""
    try:
        return {i for i in (_identity(p) for p in directory.iterdir() if p.is_file()) if i is not None}
    except OSError:
        return set()


def _ancestors(real: Path) -> Iterator[Path]:
    """`real` and each existing directory above it."""
    yield real
    yield from real.parents


def check_not_input(out: Path | str, flag: str, inputs: Inputs = (), stores: Inputs = (), keep: Inputs = ()) -> Path:
    """Refuse an output path that would overwrite, replace or land inside an input of the run.

    The one check every output path goes through (given the run's inputs), before any work:
    `out` may not be an input file, lie inside an input directory (a model dir: each file in
    it is the model), contain an input (a directory output that is created or replaced), sit
    where an input's name would be taken for one of out's temp leftovers (`.tmp-<name>.*`,
    deleted by the next run's cleanup), or lie inside a baseline store (`stores`). Paths are
    compared resolved (symlinks) and by (st_dev, st_ino) of the file and of every directory
    above it (hard links, bind mounts). `keep`: directories out may not be or contain, though
    it may lie inside them (the current directory of a command that replaces its output dir).
    Returns `out`.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    out_ids = {i for i in map(_identity, _ancestors(real)) if i is not None}
    out_id = _identity(real)
    for what, given in keep:
        k_real = Path(os.path.realpath(given))
        if real == k_real or real in k_real.parents:
            relation = "is" if real == k_real else "contains"
            raise HarnessError(f"{flag} {out} {relation} {what} ({given}), which the output would replace; "
                               "pick another path")
    for kind, group in (("input", inputs), ("store", stores)):
        for what, given in group:
            if given is None or str(given) == "":
                continue
            p = Path(given)
            p_real = Path(os.path.realpath(p))
            p_id = _identity(p_real)
            name = f"the input {what} {p}" if what.startswith("-") else f"{what} ({p})"
            if kind == "store":
                name = f"the baseline store {what} {p}"
            if real == p_real or (p_id is not None and p_id == _identity(real)):
                if kind == "store":
                    raise HarnessError(f"{flag} {out} is {name}; pick an output path outside it")
                raise HarnessError(f"{flag} {out} is {name}; writing there would destroy it: pick another path")
            if p_real in real.parents or (p_id is not None and p_real.is_dir() and p_id in out_ids):
                raise HarnessError(f"{flag} {out} lies inside {name}; pick an output path outside it")
            if out_id is not None and p_real.is_dir() and out_id in _file_identities(p_real):
                raise HarnessError(f"{flag} {out} is a hard link to a file of {name}; writing there would destroy "
                                   "it: pick another path")
            if real in p_real.parents and p_real.exists():
                raise HarnessError(f"{flag} {out} contains {name}, which the output would replace; "
                                   "pick another path")
            if (kind == "input" and p_real.parent == real.parent
                    and p_real.name.startswith(f"{TMP_PREFIX}{real.name}.")):
                raise HarnessError(f"{flag} {out}: {name} has the name of one of its temp files, which "
                                   "cleanup would delete; rename it or pick another output path")
    return out


def tmp_prefix(final: Path) -> str:
    """Temp names beside `final` carry the writer's pid, so cleanup spares a live writer's file."""
    return f"{TMP_PREFIX}{Path(final).name}.{os.getpid()}."


def clear_leftovers(final: Path) -> list[Path]:
    """Remove the temp files (or dirs) an interrupted earlier run left beside `final`; return them.

    A temp file whose pid is a process still running (a concurrent run writing the same
    output) is left alone.
    """
    final = Path(final)
    removed = []
    for p in final.parent.glob(glob.escape(TMP_PREFIX + final.name) + ".*"):
        pid = p.name[len(TMP_PREFIX + final.name) + 1:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, run by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: Path, flag: str = "output") -> Iterator[Path]:
    """Yield a temp path in final's directory; on success rename it over `final`.

    On any exception (KeyboardInterrupt included) the temp file is removed.
    """
    final = Path(final)
    check_writable_dir(final.parent, flag, create=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(final), dir=final.parent)
    except OSError as exc:
        raise HarnessError(f"{flag}: cannot create a file in {final.parent} ({exc.strerror}); "
                           "pick a writable path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide the output from other users
        os.replace(tmp_path, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and (exc.errno in _OUTPUT_ERRNOS or exc.filename in (tmp, str(final))):
            raise HarnessError(f"{flag}: cannot write {final} ({exc.strerror}); "
                               "free some space or pick another path") from None
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, flag: str = "output") -> Iterator[Path]:
    """Yield a new temp directory beside `final`; on success it takes `final`'s place.

    An existing `final` directory is swapped out, then deleted (callers decide beforehand
    whether it may be replaced). On any exception (KeyboardInterrupt included) the temp
    directory is removed and `final` is as it was; after SIGKILL at most a `.tmp-*` directory
    is left, which clear_leftovers(final) removes.
    """
    final = Path(final)
    check_writable_dir(final.parent, flag, create=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), dir=final.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the output from other users
        if final.is_dir():
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix(final) + "old.", dir=final.parent))
            os.replace(final, old / "dir")
        os.replace(tmp, final)
    except BaseException:
        if old is not None and (old / "dir").is_dir() and not final.exists():
            os.replace(old / "dir", final)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(final: Path, text: str, flag: str = "output") -> None:
    with atomic_path(final, flag) as tmp:
        tmp.write_text(text, encoding="utf-8")
