"""The command that re-runs this pytest selection with other flags, to paste verbatim.

Used by the "no baseline" message: the same invocation (test paths, -k, -m, -n, every
harness option) with the baseline-update flags replaced. It works when pasted because:
- it is rebuilt from pytest's own record of the arguments (config.invocation_params), not
  from option values, so nothing the user typed is dropped (-k and -m included);
- path options are written in `=` form (`--model-dir=PATH`): pytest chooses its rootdir from
  the bare arguments before plugins parse theirs, so `--model-dir PATH` could move it;
- every word is shell-quoted (`-k 'layer1- and nvfp4'`);
- the program is `pytest` when the one on PATH belongs to this interpreter, else
  `<this python> -m pytest`; a `cd` is prefixed when pytest ran from another directory.
PYTEST_ADDOPTS and ini addopts are not repeated: the same shell and rootdir apply them again.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

# Harness options whose value is a path (always written with '=').
PATH_OPTIONS = ("--model-dir", "--smooth-model-dir", "--xy-path", "--thresholds", "--baselines-dir",
                "--tokenwise-report", "--tokenwise-html", "--tokenwise-cache-dir")
UPDATE_FLAGS = ("--update-baselines", "--update-baselines-new")


def normalized_args(args: Sequence[str], drop: Iterable[str] = UPDATE_FLAGS,
                    path_options: Iterable[str] = PATH_OPTIONS) -> list[str]:
    """args with the flags in `drop` removed and path options joined to their value by '='."""
    drop, path_options = set(drop), set(path_options)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg in drop:
            i += 1
            continue
        if arg in path_options and i + 1 < len(args):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def program(python: str | None = None) -> list[str]:
    """['pytest'] when the pytest on PATH is this interpreter's, else [python, '-m', 'pytest']."""
    python = python or sys.executable
    found = shutil.which("pytest")
    if found and Path(found).resolve().parent == Path(python).resolve().parent:
        return ["pytest"]
    return [python, "-m", "pytest"]


def rerun_command(config, add: Sequence[str]) -> str:
    """The shell command re-running this pytest invocation with `add` instead of the update flags."""
    params = config.invocation_params
    words = program() + normalized_args([str(a) for a in params.args]) + list(add)
    command = shlex.join(words)
    here = Path(params.dir)
    try:
        same = here.resolve() == Path(os.getcwd()).resolve()
    except OSError:
        same = False
    return command if same else f"cd {shlex.quote(str(here))} && {command}"
