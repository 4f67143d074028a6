"""The scoring process's CUDA start (issue 17's warm row): the driver started beside `import torch`
(device.start_cuda_driver), and CUDA linalg loaded only by a run that decomposes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenwise_harness.device import start_cuda_driver

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`code` (with sys.argv[1:] = args) in a fresh interpreter (nothing imported yet), from the repo root."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


def test_no_driver_start_where_it_cannot_help():
    """A CPU run starts nothing; nor does a process that imported torch already (this one): the
    import it would overlap is over."""
    assert start_cuda_driver("cpu") is None
    assert "torch" in sys.modules and start_cuda_driver("cuda") is None and start_cuda_driver(None) is None


def test_driver_start_imports_nothing_and_never_fails():
    """Before torch: a thread that imports neither torch nor anything else of ours, and ends
    quietly whether or not this machine has a driver; a device name pick_device will refuse
    starts nothing (the refusal stays pick_device's one line)."""
    run = python(
        "import sys\n"
        "from tokenwise_harness.device import start_cuda_driver\n"
        "assert start_cuda_driver('cpu') is None and start_cuda_driver('cuda:x') is None\n"
        "t = start_cuda_driver('auto')\n"
        "assert t is not None and t.daemon\n"
        "t.join(120)\n"
        "assert not t.is_alive()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
        "print('ok')\n")
    assert run.returncode == 0 and run.stdout.strip() == "ok" and not run.stderr, run.stderr[-2000:]


@pytest.mark.cuda
def test_driver_start_makes_the_context_torch_then_uses():
    """On a GPU: after the thread, device 0's primary context is active before torch is
    imported; torch then computes in it (the runtime API's context is the primary one)."""
    run = python(
        "import ctypes, sys\n"
        "from tokenwise_harness.device import start_cuda_driver\n"
        "start_cuda_driver('cuda').join(120)\n"
        "cuda = ctypes.CDLL('libcuda.so.1')\n"
        "dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()\n"
        "assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0\n"
        "assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0\n"
        "assert active.value == 1 and 'torch' not in sys.modules\n"
        "import torch\n"
        "x = torch.arange(1024, device='cuda', dtype=torch.float32)\n"
        "assert float((x * 2).sum()) == 1023 * 1024\n"
        "ctx = ctypes.c_void_p()\n"
        "assert cuda.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value\n"
        "print('ok')\n")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.cuda
def test_a_warm_rerun_on_cuda_never_loads_linalg(tmp_path, demo_model_dir):
    """The cold eval decomposes (CUDA linalg loads: libtorch_cuda_linalg); the warm rerun takes
    every factor from the low-rank store, so it never starts linalg, and scores the same."""
    from tokenwise_harness.capture.save_xy import save_xy

    cache = save_xy(demo_model_dir, tmp_path / "c", "c", cn=1, eu=1, length=32, device="cpu", progress=False,
                    log=lambda m: None)
    code = (
        "import json, sys\n"
        "from tokenwise_harness import cli, engine\n"
        f"rc = cli.main(['eval_fake', '--model_dir={demo_model_dir}', '--xy_path={cache}', '--ranks=8,16',\n"
        "                '--qspecs=nvfp4@16', '--device=cuda', '--out_json=' + sys.argv[-1]])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps({'rc': rc, 'started': engine._linalg_started, 'lib': 'libtorch_cuda_linalg' in maps}))\n")
    env = {"TOKENWISE_CACHE_DIR": str(tmp_path / "memo")}
    got = {}
    for name in ("cold", "warm"):
        run = python(code, str(tmp_path / f"{name}.json"), env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        got[name] = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cold"] == {"rc": 0, "started": True, "lib": True}
    assert got["warm"] == {"rc": 0, "started": False, "lib": False}
    reports = [json.loads((tmp_path / f"{n}.json").read_text())["by_layer"] for n in ("cold", "warm")]
    assert reports[0] == reports[1]
