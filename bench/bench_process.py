"""Process-level benchmark (issue 17): the whole process, side by side, in one run.

    python bench/bench_process.py --out OUT            # GPU: 4 Qwen3-8B layers, then the 36-layer 8B shape
    python bench/bench_process.py --small --out OUT    # CPU: tiny shapes, a couple of minutes

Rows, in this order (each written to OUT/bench_process.json as soon as it is measured):
  floors   bf16 matmul floor of one config (every weight's X·ΔWᵀ at the grid's token count), the
           file's sequential read rate and the engine's streaming read rate of the same cache
  seed     bench/seed_way.py as a process (transformers, bf16 model, full SVD per weight and config)
  eval_*   `python -m tokenwise_harness eval_fake` as a process: cold (empty digest memo and
           low-rank store), warm, and warm with the cache hard-linked into the model dir (a stray
           *.safetensors there: same scores, nothing extra hashed)
  engine   the in-process engine, cold (memo off), and the per-config marginal cost on a
           16-config grid (warm store) against the matmul floor; nmse against a float64 oracle
  big_*    the 36-layer 8B shape (bf16 shards + index, a synthetic compact cache): eval_fake of 3
           configs cold and warm, and the pytest gate `-k "layer35-"` warm
Every process runs under bench/peak_rss.py, which reports its peak host RSS; `baseline_rss` is
a process that only imports torch and starts CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SUMMARY: dict = {}
OUT: Path = Path(".")


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(OUT / "bench_process.log", "a") as fh:
        fh.write(line + "\n")


def save() -> None:
    tmp = OUT / "bench_process.json.tmp"
    tmp.write_text(json.dumps(SUMMARY, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, OUT / "bench_process.json")


def record(name: str, info: dict) -> dict:
    SUMMARY[name] = info
    save()
    log(f"{name}: {json.dumps(info, sort_keys=True)}")
    return info


def process(name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `python bench/peak_rss.py argv...`; wall seconds, exit code, peak RSS, reuse counters."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "peak_rss.py"), *argv], capture_output=True, text=True,
                       env=full_env, cwd=cwd)
    wall = time.perf_counter() - t
    with open(OUT / "bench_process.log", "a") as fh:
        fh.write(f"--- {name}: {' '.join(argv)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}\n")
    peak = re.findall(r"PEAK_RSS_BYTES=(\d+)", r.stderr)
    info = {"wall_s": round(wall, 2), "rc": r.returncode, "peak_rss_GiB": round(int(peak[-1]) / 2**30, 3) if peak else None,
            "command": " ".join(["python", *argv])}
    for key, pat in (("bytes_hashed", r"weight bytes hashed (\d+)"), ("eigh", r"eigendecompositions (\d+)"),
                     ("factors_reused", r"factors reused (\d+)"), ("eval_s", r"configs in ([\d.]+) s"),
                     ("seed_eval_s", r"seed_way: .* in ([\d.]+) s"), ("pytest", r"=+ (.*(?:passed|failed).*) =+")):
        m = re.findall(pat, r.stdout)
        if m:
            info[key] = m[-1] if key == "pytest" else float(m[-1])
    for kind, value in re.findall(r"(RssAnon|RssFile|RssShmem)=(\d+)", r.stderr):
        info[f"exit_{kind}_GiB"] = round(int(value) / 2**30, 3)
    if r.returncode != 0:
        info["stderr_tail"] = r.stderr[-600:]
    return record(name, info)


def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- floors


def matmul_floor(shapes: list[tuple[int, int]], n_tokens: int, device: str) -> float:
    """Seconds of one config's error GEMMs at the card's bf16 rate: X [n, in] · Wᵀ for every weight."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    groups: dict[tuple[int, int], int] = {}
    for s in shapes:
        groups[s] = groups.get(s, 0) + 1
    total = 0.0
    for (out_f, in_f), count in groups.items():
        x = torch.randn(n_tokens, in_f, device=device).to(dtype)
        w = torch.randn(out_f, in_f, device=device).to(dtype)
        x @ w.T
        cuda_sync()
        reps = 5
        t = time.perf_counter()
        for _ in range(reps):
            x @ w.T
        cuda_sync()
        total += count * (time.perf_counter() - t) / reps
    return total


def read_rates(cache_path: Path, device: str, chunk: int) -> dict:
    """Sequential read of the file vs the engine's chunk stream of every tensor (no compute)."""
    from tokenwise_harness.cache import XYCache

    size = cache_path.stat().st_size
    buf = memoryview(bytearray(64 << 20))
    rates = {}
    for attempt in range(2):  # the second pass of each, after the first has settled the page cache
        t = time.perf_counter()
        with open(cache_path, "rb", buffering=0) as fh:
            while fh.readinto(buf) > 0:
                pass
        rates["file_read_GBs"] = round(size / (time.perf_counter() - t) / 1e9, 2)
        cache = XYCache(cache_path, verify=False)
        keys = sorted({k for e in cache.entries for k in (e.x_key, e.y_key) if k})
        streamed = 0
        cuda_sync()
        t = time.perf_counter()
        for key in keys:
            for _, _, (x,) in cache.stream([key], chunk, device):
                streamed += x.numel() * x.element_size()
        cuda_sync()
        rates["engine_stream_GBs"] = round(streamed / (time.perf_counter() - t) / 1e9, 2)
    rates["fraction"] = round(rates["engine_stream_GBs"] / rates["file_read_GBs"], 3)
    rates["cache_bytes"] = size
    return rates


# ----------------------------------------------------------------------------------- in-process engine


def engine_run(model_dir: Path, cache_path: Path, grid, device: str, chunk: int):
    from tokenwise_harness import engine as evaluate
    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import ModelDir

    cache = XYCache(cache_path)
    stats = evaluate.EngineStats()
    source = evaluate.CheckpointWeights(ModelDir(model_dir), False)
    cuda_sync()
    t = time.perf_counter()
    cache.verify_in_background()
    results = evaluate.evaluate_grid(cache, source, grid, chunk, device, progress=False, stats=stats)
    cuda_sync()
    cache.wait_verified()
    return results, stats, time.perf_counter() - t


def oracle_nmse(model_dir: Path, cache_path: Path, path: str, cfg, device: str) -> float:
    """nmse of one projection and config, everything in float64 (an independent reference)."""
    import torch

    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import ModelDir
    from tokenwise_harness.numerics.svdq import fake_quantize_weight

    mdir, cache = ModelDir(model_dir), XYCache(cache_path, verify=False)
    w = mdir.read(path + ".weight").to(device=device, dtype=torch.float64)
    b = mdir.read(path + ".bias")
    w_tilde = fake_quantize_weight(w.float(), cfg).double()
    entry = next(e for e in cache.entries if e.target.path == path)
    sse = denom = 0.0
    for start in range(0, cache.n_tokens, 2048):
        end = min(start + 2048, cache.n_tokens)
        x = cache.rows(entry.x_key, start, end).to(device=device, dtype=torch.float64)
        ref = x @ w.T + (0 if b is None else b.to(device=device, dtype=torch.float64))
        y = cache.rows(entry.y_key, start, end).to(device=device, dtype=torch.float64) if entry.y_key else ref
        e = x @ w_tilde.T + (0 if b is None else b.to(device=device, dtype=torch.float64)) - y
        sse += float((e * e).sum())
        denom += float((y * y).sum())
    return sse / denom


# ----------------------------------------------------------------------------------- the 36-layer shape


def write_big_model(out: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int,
                    layers_per_shard: int, device: str, dtype_name: str = "bfloat16") -> None:
    """A Qwen3-shaped checkpoint (random N(0, 1/in) weights) written shard by shard, no transformers:
    one model.safetensors, or shards and their index."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    dtype = getattr(torch, dtype_name)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": dtype_name}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator(device=device).manual_seed(0)

    def rand(out_f, in_f):
        return (torch.randn(out_f, in_f, generator=g, device=device) / in_f**0.5).to(dtype).cpu()

    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    n_shards = -(-layers // layers_per_shard)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" if n_shards > 1 else "model.safetensors"
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = rand(vocab, hidden)
        for layer in range(s * layers_per_shard, min(layers, (s + 1) * layers_per_shard)):
            p = f"model.layers.{layer}."
            for mod, (o, i) in shapes.items():
                tensors[p + mod + ".weight"] = rand(o, i)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[p + norm + ".weight"] = torch.ones(hidden, dtype=dtype)
            for norm in ("self_attn.q_norm", "self_attn.k_norm"):
                tensors[p + norm + ".weight"] = torch.ones(head_dim, dtype=dtype)
        if s == n_shards - 1:
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
            tensors["lm_head.weight"] = rand(vocab, hidden)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    if n_shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def write_synthetic_cache(path: Path, model_dir: Path, n_tokens: int, device: str, compact: bool = True) -> None:
    """A save_xy-format cache for every projection of model_dir, without a forward pass: random
    fp16 inputs with a few large channels (one per input group, as siblings share it), Y =
    fp16(X·Wᵀ) in the seed layout; save_xy's metadata and per-tensor sha256 checksums (hashed
    on a thread pool; the header's placeholders are rewritten in place, as save_xy does)."""
    import hashlib
    import struct
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from tokenwise_harness import __version__
    from tokenwise_harness.cache import FORMAT_VERSION
    from tokenwise_harness.capture.save_xy import _cache_layout
    from tokenwise_harness.checkpoint import ModelDir

    mdir = ModelDir(model_dir)
    targets = []
    for t in mdir.targets():
        with __import__("safetensors").safe_open(str(mdir.safetensors_index[t.path + ".weight"]), "pt") as fh:
            out_f, in_f = fh.get_slice(t.path + ".weight").get_shape()
        targets.append((t, SimpleNamespace(in_features=in_f, out_features=out_f)))
    shapes, aliases = _cache_layout(targets, n_tokens, compact=compact)
    g = torch.Generator(device=device).manual_seed(1)
    inputs: dict = {}

    def x_of(target, width):
        if target.input_group not in inputs:
            inputs.clear()  # one group's X at a time
            x = torch.randn(n_tokens, width, generator=g, device=device)
            x[:, :: max(1, width // 8)] *= 20.0  # a few large input channels, as real activations have
            inputs[target.input_group] = x.half()
        return inputs[target.input_group]

    def tensor_bytes(key):
        target = next(t for t, _ in targets if key.startswith(t.path + "."))
        x = x_of(target, shapes[key][1] if key.endswith(".X") else None) if key.endswith(".X") else None
        if key.endswith(".Y"):
            x = x_of(target, next(m.in_features for t, m in targets if t == target))
            w = mdir.read(target.path + ".weight", device).float()
            t_ = (x.float() @ w.T).half()
        else:
            t_ = x
        return t_.cpu().contiguous().view(torch.uint8).numpy().reshape(-1)

    meta = {"seed": "0", "cn": "0", "eu": "0", "length": str(n_tokens), "save_dtype": "fp16",
            "format_version": FORMAT_VERSION, "model_fingerprint": mdir.fingerprint, "data_fingerprint": "synthetic",
            "n_tokens": str(n_tokens), "model_name": mdir.name, "torch_dtype": "auto", "harness_version": __version__}
    if aliases:
        meta["x_aliases"] = json.dumps(aliases, sort_keys=True)

    def header(sums):
        h, offset = {"__metadata__": dict(meta, checksums=json.dumps(sums, sort_keys=True))}, 0
        for k, (n, width) in shapes.items():
            h[k] = {"dtype": "F16", "shape": [n, width], "data_offsets": [offset, offset + n * width * 2]}
            offset += n * width * 2
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * (-(len(text) + 8) % 8)
        return struct.pack("<Q", len(text)) + text

    placeholder = header({k: "0" * 64 for k in shapes})
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)) as pool, open(path, "wb") as fh:
        fh.write(placeholder)
        digests = {}
        for key in shapes:
            data = tensor_bytes(key)
            fh.write(data)
            digests[key] = pool.submit(lambda d: hashlib.sha256(d).hexdigest(), data)
        final = header({k: f.result() for k, f in digests.items()})
        assert len(final) == len(placeholder)
        fh.seek(0)
        fh.write(final)


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where bench_process.json and bench_process.log go")
    p.add_argument("--work", default=None, help="scratch dir for models and caches (default: /dev/shm or /tmp)")
    p.add_argument("--small", action="store_true", help="CPU-sized shapes")
    p.add_argument("--big_tokens", type=int, default=None, help="tokens of the 36-layer synthetic cache")
    p.add_argument("--skip", default="", help="comma-separated row groups to skip: seed,floors,stray,profile,marginal,big,gate,gate_update")
    p.add_argument("--synthetic4", action="store_true",
                   help="the 4-layer model and its seed-layout cache written directly (random fp32 weights, random X, "
                        "Y = X·Wᵀ) instead of make_demo_model + save_xy: the same shapes, a minute less")
    a = p.parse_args(argv)
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.small:
        shape4 = dict(hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2, num_layers=4)
        samples = dict(cn=2, eu=2, length=64)
        big = dict(layers=6, hidden=128, inter=384, heads=4, kv_heads=2, vocab=1024, layers_per_shard=2)
        big_tokens, chunk = a.big_tokens or 256, 128
    else:
        shape4 = dict(hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8, num_layers=4)
        samples = dict(cn=50, eu=80, length=128)
        big = dict(layers=36, hidden=4096, inter=12288, heads=32, kv_heads=8, vocab=151936, layers_per_shard=4)
        big_tokens, chunk = a.big_tokens, 4096
    shm = Path("/dev/shm")
    on_shm = shm.is_dir() and shutil.disk_usage(shm).free > (70 << 30)
    work = Path(a.work or (shm / "tokenwise_bench" if on_shm else "/tmp/tokenwise_bench"))
    if big_tokens is None:  # half the 4-layer rows' 16,640 tokens: 14.5 GB of cache, written in seconds
        big_tokens = 8192
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    SUMMARY.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                   shape4=shape4, samples=samples, big=big, big_tokens=big_tokens, chunk_tokens=chunk, work=str(work),
                   cpu_count=os.cpu_count())
    save()
    ranks, qspecs = "8,16,32", "nvfp4@16"
    py = "-m"

    process("baseline_rss", [str(ROOT / "bench" / "cuda_init.py")])
    process("baseline_rss_with_libs", [str(ROOT / "bench" / "cuda_init.py"), "--libs"])

    # ---- the 4-layer model and its seed-layout cache
    from tokenwise_harness.demo.models import make_demo_model

    m4, cdir = work / "m4", work / "c"
    cache = cdir / "seed.safetensors"
    t = time.perf_counter()
    if a.synthetic4:
        cdir.mkdir()
        write_big_model(m4, device=device, dtype_name="float32", layers=shape4["num_layers"], vocab=1024,
                        layers_per_shard=shape4["num_layers"], hidden=shape4["hidden_size"],
                        inter=shape4["intermediate_size"], heads=shape4["num_heads"], kv_heads=shape4["num_kv_heads"])
        os.environ["TOKENWISE_CACHE_DIR"] = str(work / "memo_setup")  # the setup's digests stay out of memo_a
        write_synthetic_cache(cache, m4, samples["cn"] * samples["length"] + samples["eu"] * samples["length"], device,
                              compact=False)
        record("build_model4_and_synthetic_seed_cache", {"seconds": round(time.perf_counter() - t, 1),
                                                         "cache_bytes": cache.stat().st_size})
    else:
        make_demo_model("qwen3", m4, **shape4)
        record("build_model4", {"seconds": round(time.perf_counter() - t, 1)})
        process("save_xy_seed_layout", [py, "tokenwise_harness", "save_xy", f"--model_dir={m4}", f"--save_path={cdir}",
                                        "--label=seed", f"--cn={samples['cn']}", f"--eu={samples['eu']}",
                                        f"--length={samples['length']}", "--batch_size=16"])

    # ---- floors
    from tokenwise_harness.cache import XYCache
    from tokenwise_harness.checkpoint import ModelDir

    n_tokens = XYCache(cache).n_tokens
    mdir = ModelDir(m4)
    weight_shapes = []
    for t_ in mdir.targets():
        with __import__("safetensors").safe_open(str(mdir.safetensors_index[t_.path + ".weight"]), "pt") as fh:
            weight_shapes.append(tuple(fh.get_slice(t_.path + ".weight").get_shape()))
    floor = matmul_floor(weight_shapes, n_tokens, device)
    record("floors", {} if "floors" in skip else {"matmul_floor_s_per_config": round(floor, 4), "n_tokens": n_tokens,
                      "flops_per_config": 2 * n_tokens * sum(o * i for o, i in weight_shapes),
                      "bf16_TFLOPs": round(2 * n_tokens * sum(o * i for o, i in weight_shapes) / floor / 1e12, 1),
                      **read_rates(cache, device, chunk)})
    if "floors" in skip:
        record("floors", {"matmul_floor_s_per_config": round(floor, 4), "n_tokens": n_tokens})

    # ---- the seed's flow as a process
    if "seed" not in skip:
        process("seed_process", [str(ROOT / "bench" / "seed_way.py"), f"--model_dir={m4}", f"--xy_path={cache}",
                                 f"--out_json={work / 'seed.json'}", f"--ranks={ranks}", f"--qspecs={qspecs}",
                                 f"--chunk_tokens={chunk}"])

    # ---- eval_fake as a process: cold, warm, warm with the cache inside the model dir
    memo_a = work / "memo_a"
    eval_args = [py, "tokenwise_harness", "eval_fake", f"--model_dir={m4}", f"--xy_path={cache}", f"--ranks={ranks}",
                 f"--qspecs={qspecs}", f"--chunk_tokens={chunk}"]
    env_a = {"TOKENWISE_CACHE_DIR": str(memo_a)}
    process("eval_fake_cold", [*eval_args, f"--out_json={work / 'cold.json'}"], env_a)
    process("eval_fake_warm", [*eval_args, f"--out_json={work / 'warm.json'}"], env_a)
    # the same with a two-slot pinned arena (two chunks of host memory, TOKENWISE_STREAM_SLOTS=2)
    process("eval_fake_warm_two_slots", [*eval_args, f"--out_json={work / 'warm2.json'}"],
            {**env_a, "TOKENWISE_STREAM_SLOTS": "2"})
    if "profile" not in skip:  # where the process's time goes, cold (a fresh memo) and warm: the main thread
        process("eval_fake_cold_profiled", [str(ROOT / "bench" / "profile_eval.py"), f"--out={OUT / 'profile_cold.txt'}",
                                            "--", *eval_args[2:], f"--out_json={work / 'cold_p.json'}"],
                {"TOKENWISE_CACHE_DIR": str(work / "memo_p")})
        process("eval_fake_warm_profiled", [str(ROOT / "bench" / "profile_eval.py"), f"--out={OUT / 'profile_warm.txt'}",
                                            "--", *eval_args[2:], f"--out_json={work / 'warm_p.json'}"], env_a)
    if "stray" not in skip:
        os.link(cache, m4 / "xy-seed.safetensors")  # a stray *.safetensors in the model dir (no copy)
        process("eval_fake_warm_cache_in_model_dir", [*eval_args, f"--out_json={work / 'stray.json'}"], env_a)
        (m4 / "xy-seed.safetensors").unlink()
    reports = {n: json.loads((work / f"{n}.json").read_text())["by_layer"] for n in ("cold", "warm", "stray")
               if (work / f"{n}.json").is_file()}
    record("eval_fake_same_scores", {"warm_equals_cold": reports.get("warm") == reports.get("cold"),
                                     "stray_equals_cold": reports.get("stray") == reports.get("cold")})

    # ---- in-process engine: cold (memo off); marginal per config (warm store); float64 oracle
    from tokenwise_harness import memo
    from tokenwise_harness.grid import SvdqConfig, build_grid, parse_qspecs, parse_ranks

    grid3 = build_grid(parse_ranks(ranks), parse_qspecs(qspecs))
    os.environ["TOKENWISE_NO_MEMO"] = "1"
    _, stats, seconds = engine_run(m4, cache, grid3, device, chunk)
    record("engine_cold_in_process", {"seconds": round(seconds, 2), "decompose_s": round(stats.seconds_decompose, 2),
                                      "decompositions": stats.decompositions, "error_s": round(stats.seconds_error, 2),
                                      "quantize_s": round(stats.seconds_quantize, 2)})
    del os.environ["TOKENWISE_NO_MEMO"]
    os.environ["TOKENWISE_CACHE_DIR"] = str(memo_a)
    results16 = None
    if "marginal" not in skip:
        # max rank 32 in both: the factors eval_fake stored above serve them (no decomposition)
        grid16 = build_grid([8, 16, 24, 32], parse_qspecs("nvfp4@16,nvfp4@128,mxfp4@32,int4@128"))
        grid1 = [SvdqConfig(32, "nvfp4", 16)]
        # One untimed pass first: it compiles the fused ΔW kernel's variants (Triton keeps them on disk,
        # so a process pays this once per machine, not per run) and settles the page cache.
        t_warm = engine_run(m4, cache, grid16, device, chunk)[2]
        t1 = engine_run(m4, cache, grid1, device, chunk)[2]
        results16, stats16, t16 = engine_run(m4, cache, grid16, device, chunk)
        marginal = (t16 - t1) / (len(grid16) - 1)
        record("marginal_per_config", {"t_16_configs_first_pass_s": round(t_warm, 3),
                                       "t_1_config_s": round(t1, 3), "t_16_configs_s": round(t16, 3),
                                       "marginal_s": round(marginal, 4), "floor_s": round(floor, 4),
                                       "x_floor": round(marginal / floor, 2), "decompositions": stats16.decompositions,
                                       "quantize_s": round(stats16.seconds_quantize, 3),
                                       "error_s": round(stats16.seconds_error, 3)})
    checks = {}
    for path in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        cfg = SvdqConfig(8, "nvfp4", 16)
        t_ = next(t for t in mdir.targets() if t.path == path)
        if results16 is None:
            results16 = engine_run(m4, cache, [cfg], device, chunk)[0]
        got = results16[(t_.layer, t_.block, t_.proj)][cfg.key]["nmse"]
        want = oracle_nmse(m4, cache, path, cfg, device)
        checks[path] = {"engine": got, "float64": want, "rel": abs(got - want) / want}
    record("nmse_vs_float64", checks)
    if "seed" not in skip and (work / "seed.json").is_file():
        seed = json.loads((work / "seed.json").read_text())["results"]["0.mlp.down_proj"]["rank=8;fmt=nvfp4;blk=16"]
        record("nmse_seed_vs_engine_down0_rank8", {"seed": seed["nmse"], "engine": checks[
            "model.layers.0.mlp.down_proj"]["engine"]})
    shutil.rmtree(m4)
    shutil.rmtree(cdir)

    # ---- the 36-layer 8B shape
    if "big" in skip:
        return 0
    mb, cb = work / "m36", work / "c36.safetensors"
    t = time.perf_counter()
    write_big_model(mb, device=device, **big)
    os.environ["TOKENWISE_CACHE_DIR"] = str(work / "memo_setup")  # the setup's digests stay out of memo_b
    memo.clear_process_memo()
    write_synthetic_cache(cb, mb, big_tokens, device, compact=True)
    record("build_big", {"seconds": round(time.perf_counter() - t, 1),
                         "weights_GB": round(sum(f.stat().st_size for f in mb.iterdir()) / 1e9, 2),
                         "cache_GB": round(cb.stat().st_size / 1e9, 2)})
    env_b = {"TOKENWISE_CACHE_DIR": str(work / "memo_b")}
    big_args = [py, "tokenwise_harness", "eval_fake", f"--model_dir={mb}", f"--xy_path={cb}", f"--ranks={ranks}",
                f"--qspecs={qspecs}", f"--chunk_tokens={chunk}", f"--out_json={work / 'big.json'}"]
    process("big_eval_fake_cold", big_args, env_b)
    process("big_eval_fake_warm", big_args, env_b)
    if "gate" not in skip:
        gate = work / "gate"
        gate.mkdir()
        from importlib.metadata import entry_points

        installed = any(ep.name == "tokenwise" for ep in entry_points(group="pytest11"))
        plugin = [] if installed else ["-p", "tokenwise_harness.pytest_plugin.hooks"]
        gate_args = [py, "pytest", *plugin, "-p", "no:cacheprovider", "-q",
                     f"--rootdir={gate}", f"--model-dir={mb}", f"--xy-path={cb}", f"--ranks={ranks}",
                     f"--qspecs={qspecs}", f"--baselines-dir={gate / 'baselines'}", "-k", f"layer{big['layers'] - 1}-"]
        if "gate_update" in skip:  # one warm run that also writes the baselines
            process("big_gate_warm", [*gate_args, "--update-baselines"], env_b, cwd=gate)
        else:
            process("big_gate_update_baselines", [*gate_args, "--update-baselines"], env_b, cwd=gate)
            process("big_gate_warm", gate_args, env_b, cwd=gate)
        # The same warm gate with only the harness's plugin loaded: what a CI gate job pays without the
        # third-party plugins this machine has installed (hypothesis's imports hypothesis at session end).
        lean = ["-p", "tokenwise_harness.pytest_plugin.hooks"] + gate_args[2 + len(plugin):]
        process("big_gate_warm_plugin_autoload_off", [py, "pytest", *lean],
                {**env_b, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, cwd=gate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
