"""pytest11 entry point of tokenwise_harness.

Imported by every pytest run in an environment that has the package, so it stays free of
torch/transformers imports and adds nothing unless --model-dir, --smooth-model-dir or
--xy-path is given. Every hook is a one-liner that delegates to the HarnessSession kept in
config.stash (session.py): it collects, selects, records and reports.
"""

from __future__ import annotations

from typing import Any

import pytest

_SESSION = pytest.StashKey()
HARNESS_OPTIONS = ("model_dir", "smooth_model_dir", "xy_path")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("tokenwise", "tokenwise precision harness (SVDQuant fake quantization)")
    g.addoption("--model-dir", default=None, help="Hugging Face model dir to gate (enables the harness)")
    g.addoption("--smooth-model-dir", default=None, help="smoothed model dir (from `tokenwise-precision smooth`)")
    g.addoption("--xy-path", default=None, help="existing save_xy cache; without it one is captured and reused")
    g.addoption("--ranks", default=None, help="comma-separated ranks (default: thresholds.yaml grid, else 16,32)")
    g.addoption("--qspecs", default=None, help="comma-separated fmt@blk (default: thresholds.yaml grid, else nvfp4@128)")
    g.addoption("--smooth-alpha", default=None,
                help="also gate --model-dir smoothed on the cache: a fixed alpha (e.g. 0.5) or 'search'")
    g.addoption("--act-qspecs", default=None, help="activation fmt@blk specs (W4A4), optional")
    g.addoption("--grid-mode", default=None, help="combined or full")
    g.addoption("--lowrank-iters", default=None, type=int, help="low-rank refinement iterations (default 1)")
    g.addoption("--chunk-tokens", default=4096, type=int, help="tokens per chunk (default 4096)")
    g.addoption("--thresholds", default=None, help="thresholds YAML (default: thresholds.yaml at the rootdir)")
    g.addoption("--baselines-dir", default=None, help="baseline store (default: baselines/ at the rootdir)")
    g.addoption("--update-baselines", action="store_true", help="rewrite the baselines of the cases that ran")
    g.addoption("--update-baselines-new", action="store_true", help="create missing baselines, keep existing ones")
    g.addoption("--tokenwise-report", default=None, help="write the full JSON report here at session end")
    g.addoption("--tokenwise-html", default=None,
                help="write one self-contained HTML page here at session end (heatmaps, a sortable table of every "
                     "case with its verdict, limit and baseline), e.g. --tokenwise-html=report.html")
    g.addoption("--weight-quantizer", default=None,
                help="your weight-level kernel fn(weight, cfg) -> W~ as package.module:function (run per weight on the "
                     "scoring device, once per selected case), or 'torchao'")
    g.addoption("--quantizer", default=None,
                help="your model-level fake_op(model, cfg) as package.module:function (quantizes the whole model per "
                     "config; under -k a model holding only the selected decoder layers; --weight-quantizer is the fast "
                     "protocol)")
    g.addoption("--device", default=None, help="cpu, cuda or cuda:N (default cuda when present; xdist: one GPU per worker)")
    g.addoption("--torch-dtype", default="auto", help="dtype for loading models (auto|fp16|bf16|fp32)")
    g.addoption("--xy-cn", default=None, type=int,
                help="capture: Chinese samples (default: thresholds.yaml capture.cn, else 50)")
    g.addoption("--xy-eu", default=None, type=int,
                help="capture: non-Chinese samples (default: thresholds.yaml capture.eu, else 80)")
    g.addoption("--xy-length", default=None, type=int,
                help="capture: tokens per sample (default: thresholds.yaml capture.length, else 128)")
    g.addoption("--xy-seed", default=None, type=int,
                help="capture: sampling seed (default: thresholds.yaml capture.seed, else 0)")
    g.addoption("--xy-full", action="store_true",
                help="capture: the seed's full layout (every X and Y) instead of the compact one (shared X, no Y)")
    g.addoption("--tokenwise-cache-dir", default=None,
                help="where captured caches, smoothed models, the weight-digest memo and low-rank factors live "
                     "(default $TOKENWISE_CACHE_DIR, else "
                     "$XDG_CACHE_HOME/tokenwise_harness, i.e. ~/.cache/tokenwise_harness); "
                     "list and prune with `tokenwise-precision cache ls|prune`")


def _call(config: pytest.Config, method: str, *args: object) -> Any:
    """session.method(*args) on this run's HarnessSession; nothing when the harness is off."""
    harness = config.stash.get(_SESSION, None)
    return getattr(harness, method)(*args) if harness is not None else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tokenwise: a generated tokenwise precision case")
    if not config.pluginmanager.hasplugin("xdist"):  # cases carry xdist's marker; without xdist it is ours
        config.addinivalue_line("markers", "xdist_group(name): cases that read one cached input (for pytest-xdist)")
    if any(config.getoption(name) for name in HARNESS_OPTIONS):
        from tokenwise_harness.pytest_plugin.session import HarnessSession

        config.stash[_SESSION] = HarnessSession.start(config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    return _call(config, "make_scheduler", log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    _call(node.config, "configure_node", node)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _call(session.config, "prepare_cache")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _call(config, "collect", session, items)


def pytest_report_header(config: pytest.Config) -> str | None:
    return _call(config, "header")


def pytest_report_teststatus(report, config):
    return _call(config, "teststatus", report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    _call(config, "terminal_summary", terminalreporter)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _call(session.config, "finish", session)
