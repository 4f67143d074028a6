"""Small test helpers shared by several test files (no fixtures here: see conftest.py)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path


def run_cli_subprocess(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the console script in a fresh interpreter, exactly as a user would."""
    return subprocess.run([sys.executable, "-m", "tokenwise_harness", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run the CLI's main() in this process (no interpreter start-up), capturing its output.

    An unexpected exception propagates, so a test sees an internal error as a failure.
    """
    from tokenwise_harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the CLI failed the way bad input must: exit 2, one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())


REPO = Path(__file__).resolve().parents[1]
REPO_SMOLLM2 = REPO / "models" / "smollm2"  # where README tells users to import it (git-ignored)


def repo_smollm2() -> Path:
    """SmolLM2-135M imported at models/smollm2 in the repo, as the README's self-gate command needs it.

    Imported once (~45 s) under a file lock, so every xdist worker and every test file that needs
    the real model (test_smollm2.py, test_selfgate.py) shares one import; a later run finds it
    imported (import_gguf keeps a dir made from the same file).
    """
    import fcntl

    from tokenwise_harness.gguf_import import import_gguf

    REPO_SMOLLM2.parent.mkdir(exist_ok=True)
    with open(REPO_SMOLLM2.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return import_gguf(None, REPO_SMOLLM2, log=lambda m: None)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
