"""The repo gates itself (issue 16): `python -m pytest --model-dir=models/smollm2` at the repo root.

The committed thresholds.yaml (grid nvfp4@16, mxfp4@32, int4@64 x ranks 16, 32; a 512-token
capture; layers 0, 15, 29) and baselines/ are tuned on SmolLM2-135M, imported where the README
says (models/smollm2, shared with test_smollm2.py). Each gate run is a fresh pytest process at
the repo root, exactly the README's command: the built-in engine passes; an independent
correct kernel (tests/weight_kernels.py:svdq: float64 SVD, its own casts, another rounding order)
passes; the same kernel with a 10% scale bug fails every case it runs, as regressions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, repo_smollm2

N_CASES = 3 * 7 * 6  # layers x projections x configs of thresholds.yaml


@pytest.fixture(scope="module")
def model():
    from tokenwise_harness.demo.job import smollm2_unavailable

    why = smollm2_unavailable()
    if why is not None:
        pytest.skip(f"SmolLM2-135M not available: {why}")
    return repo_smollm2()


def gate(*args: str) -> subprocess.CompletedProcess:
    """The README's self-gate command (plus args) in a fresh process at the repo root."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: the outer run's workers share the cores
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "--model-dir=models/smollm2", "-p", "no:cacheprovider",
                           "-q", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def outcome(proc) -> dict[str, int]:
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|deselected|error)", last)}


def test_self_gate_passes_on_committed_baselines(model):
    proc = gate()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert outcome(proc) == {"passed": N_CASES}
    assert "differs: baseline" not in proc.stdout.replace("git_commit differs", "")  # same model, cache, quantizer


def test_independent_kernel_passes_scale_bug_fails(model):
    proc = gate("--weight-quantizer", "tests.weight_kernels:svdq", "-k", "not layer15-")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert outcome(proc) == {"passed": N_CASES * 2 // 3, "deselected": N_CASES // 3}
    proc = gate("--weight-quantizer", "tests.weight_kernels:scale_bug", "-k", "layer0-")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert outcome(proc) == {"failed": N_CASES // 3, "deselected": N_CASES * 2 // 3}
    text = proc.stdout
    assert "FAILED tokenwise::layer0-self_attn-q_proj-rank16-nvfp4-blk16 - nmse = " in text
    assert "Traceback" not in text and "INTERNALERROR" not in text
