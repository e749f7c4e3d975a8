#!/usr/bin/env python
"""SAM image encoder speed: official attention vs SDPA attention (model/sam_attention.py), eager
and torch.compile'd, against the floor set by the encoder's FLOPs and the measured matmul peak.

    python tools/bench_sam_encoder.py --out runs/bench_sam_encoder.json          # ViT-H, CUDA, bf16
    python tools/bench_sam_encoder.py --variant tiny --device cpu --out /tmp/b.json   # code-path check

What it does (random weights, SAM's own initialisation plus random relative-position tables so
the bias is not zero; random 1024x1024 inputs):

1. times a large bf16 matmul (the peak that sets the floor);
2. counts the encoder's FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over the official
   module, cross-checked by an analytic count): floor = FLOPs / peak;
3. runs the official encoder in float32 (TF32 off) as the accuracy reference, and each SDPA mode
   in float32 against it (the equivalence check at full size);
4. in ``--dtype`` (bf16), batch 1 and 2: the official encoder eagerly, then every SDPA mode
   ("mask", "fold", "fold_flash") with the default SDPA dispatch and with each backend forced
   (efficient, cuDNN, flash where the mode allows it): median of ``--repeats`` runs after warm-up,
   synchronised, peak memory, max abs difference and relative error against the official bf16
   output and against the float32 output;
5. ``torch.compile``s the fastest eager SDPA variant (per block by default, as ``--compile_sam``
   does: one graph for the window blocks and one for the global blocks, reused by all 32;
   ``--compile-scope encoder`` for the whole encoder) and times it the same way; compile time
   (first call) reported apart;
6. profiles one batch-1 call of the official encoder, of each mode with the default dispatch (which
   attention kernel it gets), of the fastest eager variant and of the compiled one (top GPU kernels).

Prints a table last and writes everything to ``--out`` (JSON). Steps past ``--budget-s`` seconds
are skipped (recorded as such), so one run stays short. Measurement code lives here only; the
library part is ``model/sam_attention.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from model.sam import SAM_VARIANTS, build_sam  # noqa: E402
from model.sam_compile import compile_image_encoder, uncompile_image_encoder  # noqa: E402
from model.sam_attention import (  # noqa: E402
    DEFAULT_REL_POS_MODE,
    REL_POS_MODES,
    attention_implementation,
    use_fast_attention,
    use_official_attention,
)
from utils.mixed_precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="vit_h", choices=list(SAM_VARIANTS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--batches", default="1,2", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement, median reported (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--modes", default=",".join(REL_POS_MODES), help="SDPA rel-pos modes to time")
    p.add_argument("--backends", default="auto",
                   help="SDPA backends to force per mode besides the default dispatch: comma-separated "
                   "subset of efficient,cudnn,flash,math, or 'auto' (efficient,cudnn,flash on CUDA; none on CPU)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="time torch.compile (auto: on CUDA only; on a CPU inductor's C++ build takes minutes)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default, max-autotune-no-cudagraphs, ...): max-autotune can take minutes")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "encoder"],
                   help="compile each Block (graphs shared by all blocks: fast to compile) or the whole encoder")
    p.add_argument("--compile-official", action="store_true", help="also torch.compile the official attention")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 reference (no fp32 errors)")
    p.add_argument("--profile", default="auto", choices=["auto", "on", "off"], help="kernel profile (auto: CUDA only)")
    p.add_argument("--budget-s", type=float, default=120.0, help="skip remaining optional steps after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the JSON report here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(args.modes) - set(REL_POS_MODES))
    if bad:
        p.error(f"unknown modes {bad}; valid: {', '.join(REL_POS_MODES)}")
    if args.backends == "auto":
        args.backends = ["efficient", "cudnn", "flash"] if args.device == "cuda" else []
    else:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 2
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    if args.compile == "auto":
        args.compile = "on" if args.device == "cuda" else "off"
    if args.profile == "auto":
        args.profile = "on" if args.device == "cuda" else "off"
    return args


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median / min / all wall times (ms) of ``fn()``, synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": [round(t, 4) for t in times]}


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak allocated memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def matmul_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured dense-matmul throughput in ``dtype`` (TFLOP/s): the ceiling of the floor."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = time_calls(lambda: a @ b, device, warmup=5 if device.type == "cuda" else 1,
                       repeats=20 if device.type == "cuda" else 3)
    tflops = 2 * n**3 / (stats["median_ms"] * 1e-3) / 1e12
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": stats["median_ms"],
            "tflops": tflops, "best_tflops": 2 * n**3 / (stats["min_ms"] * 1e-3) / 1e12}


def analytic_flops(spec, batch: int = 1) -> dict:
    """FLOPs (2 per multiply-add) of one ImageEncoderViT forward, counted by hand: matmuls and
    convolutions only, as FlopCounterMode counts them. Window blocks run qkv/proj and attention
    on the padded grid (ceil(G/w)*w squared tokens), as the official code does."""
    g = spec.image_size // spec.patch_size
    d, heads, c = spec.encoder_embed_dim, spec.encoder_num_heads, spec.prompt_embed_dim
    hd = d // heads
    mlp = int(d * spec.encoder_mlp_ratio)
    tokens = g * g
    total = {"patch_embed": 2 * tokens * d * 3 * spec.patch_size**2, "linear": 0, "attention": 0, "rel_pos": 0,
             "neck": 2 * tokens * d * c + 2 * tokens * c * c * 9}
    for i in range(spec.encoder_depth):
        if i in spec.encoder_global_attn_indexes:
            w, n_win, attn_tokens = g, 1, tokens
        else:
            w = spec.window_size
            side = math.ceil(g / w) * w
            n_win, attn_tokens = (side // w) ** 2, side * side
        total["linear"] += 2 * attn_tokens * d * 4 * d + 2 * tokens * d * mlp * 2  # qkv+proj, mlp
        total["attention"] += n_win * heads * 2 * (2 * (w * w) * (w * w) * hd)  # q@k^T and attn@v
        total["rel_pos"] += n_win * heads * 2 * (2 * (w * w) * w * hd)  # rel_h and rel_w einsums
    total = {k: v * batch for k, v in total.items()}
    total["total"] = sum(total.values())
    return total


def count_flops(fn) -> int | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def kernel_profile(fn, device: torch.device, top: int = 8) -> list[dict] | str:
    """Top kernels (CUDA) or operators (CPU) of one call by self time."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        rows = []
        for evt in prof.key_averages():
            if device.type == "cuda":
                dev_us = getattr(evt, "self_device_time_total", None)
                if dev_us is None:
                    dev_us = getattr(evt, "self_cuda_time_total", 0)
            else:  # CPU: operators' own CPU time
                dev_us = evt.self_cpu_time_total
            if dev_us > 0:
                rows.append({"kernel": evt.key[:110], "calls": evt.count, "device_ms": dev_us / 1e3})
        rows.sort(key=lambda r: -r["device_ms"])
        total = sum(r["device_ms"] for r in rows)
        return [{"total_device_ms": total}] + rows[:top]
    except Exception as err:  # profiling is informative only
        return f"profile failed: {type(err).__name__}: {err}"


def compare(out: torch.Tensor, ref: torch.Tensor | None) -> dict:
    if ref is None:
        return {}
    diff = (out.float() - ref.float())
    return {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / ref.float().norm()).item()}


def backend_context(backend: str | None):
    if backend is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def randomise_rel_pos(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * 0.5).to(param.device, param.dtype))


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t0  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    dtype = PRECISIONS[args.dtype]
    spec = SAM_VARIANTS[args.variant]
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    report: dict = {
        "env": {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"),
                "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()},
        "args": {k: v for k, v in vars(args).items()},
        "variant": args.variant, "dtype": args.dtype, "image_size": spec.image_size,
        "rows": [], "fp32_equivalence": [], "skipped": [], "errors": [],
    }
    print(f"[{elapsed():6.1f}s] {report['env']['device_name']}, torch {torch.__version__}, SAM {args.variant}, {args.dtype}")

    # 1. matmul peak
    peak = matmul_peak(device, dtype)
    report["matmul_peak"] = peak
    print(f"[{elapsed():6.1f}s] {peak['dtype']} matmul {peak['n']}^3: {peak['tflops']:.1f} TFLOP/s")

    # 2. models: float32 official reference and a dtype copy
    enc32 = build_sam(args.variant, device=device, attention="official").image_encoder.eval().requires_grad_(False)
    randomise_rel_pos(enc32, args.seed)
    enc = copy.deepcopy(enc32).to(dtype)
    params = sum(p.numel() for p in enc.parameters())
    report["encoder_params"] = params
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    inputs = {b: torch.randn(b, 3, spec.image_size, spec.image_size, generator=gen).to(device) for b in args.batches}
    print(f"[{elapsed():6.1f}s] built encoder ({params / 1e6:.0f}M parameters)")

    # 3. FLOPs and floor (per image)
    with torch.no_grad():
        counted = count_flops(lambda: enc(inputs[args.batches[0]].to(dtype)))
    analytic = analytic_flops(spec)
    per_image = counted / args.batches[0] if counted else analytic["total"]
    floor_ms = per_image / (peak["tflops"] * 1e12) * 1e3
    report["flops_per_image"] = {"flop_counter": counted / args.batches[0] if counted else None,
                                 "analytic": analytic, "used": per_image}
    report["floor_ms_per_image"] = floor_ms
    print(f"[{elapsed():6.1f}s] {per_image / 1e12:.3f} TFLOP per image (analytic {analytic['total'] / 1e12:.3f}): "
          f"floor {floor_ms:.2f} ms per image at {peak['tflops']:.0f} TFLOP/s")

    # 4. float32 references (and fp32 equivalence of every mode, batch 1)
    ref32: dict[int, torch.Tensor | None] = {b: None for b in args.batches}
    if not args.no_fp32:
        with torch.no_grad():
            for b in args.batches:
                ref32[b] = enc32(inputs[b])
            b = args.batches[0]
            for mode in args.modes:
                use_fast_attention(enc32, mode)
                try:
                    out = enc32(inputs[b])
                    row = {"mode": mode, "batch": b, **compare(out, ref32[b])}
                except Exception as err:
                    row = {"mode": mode, "batch": b, "error": f"{type(err).__name__}: {err}"}
                report["fp32_equivalence"].append(row)
                print(f"[{elapsed():6.1f}s] fp32 {mode}: " + (f"max abs diff {row['max_abs']:.2e}, rel {row['rel']:.2e}"
                                                           if "max_abs" in row else row["error"]))
            use_official_attention(enc32)
    del enc32
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 5. eager timings in dtype
    variants: list[tuple[str, str | None]] = [("official", None)]
    for mode in args.modes:
        variants.append((mode, None))
        for backend in args.backends:
            if backend == "flash" and mode != "fold_flash":
                continue  # flash takes no mask and needs equal q/v head sizes: only fold_flash can use it
            variants.append((mode, backend))
    ref16: dict[int, torch.Tensor] = {}

    def set_mode(mode: str) -> None:
        if mode == "official":
            use_official_attention(enc)
        else:
            use_fast_attention(enc, mode)

    def run_row(name: str, mode: str, backend: str | None, b: int, module, compiled: bool = False, **extra) -> dict:
        x = inputs[b].to(dtype)
        row = {"name": name, "mode": mode, "backend": backend or "default", "batch": b, "compiled": compiled, **extra}
        try:
            with torch.no_grad(), backend_context(backend):
                out = module(x)
                stats = time_calls(lambda: module(x), device, args.warmup, args.repeats)
                row["peak_mem_mb"] = peak_memory_mb(lambda: module(x), device)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            report["rows"].append(row)
            print(f"[{elapsed():6.1f}s] {name:<34} b={b}: {row['error']}")
            return row
        if mode == "official" and not compiled:
            ref16[b] = out
        row.update(stats)
        row["ms_per_image"] = stats["median_ms"] / b
        row["floor_fraction"] = floor_ms / row["ms_per_image"]
        row["vs_official_dtype"] = compare(out, ref16.get(b)) if not (mode == "official" and not compiled) else {}
        row["vs_fp32"] = compare(out, ref32.get(b))
        report["rows"].append(row)
        print(f"[{elapsed():6.1f}s] {name:<34} b={b}: {stats['median_ms']:8.2f} ms"
              f"  ({row['ms_per_image']:.2f} ms/image, {100 * row['floor_fraction']:.0f}% of floor)")
        return row

    for b in args.batches:
        for mode, backend in variants:
            set_mode(mode)
            name = "official" if mode == "official" else f"sdpa:{mode}" + (f" [{backend}]" if backend else "")
            run_row(name, mode, backend, b, enc)

    def eager_ms(mode, backend, b):
        for r in report["rows"]:
            if (r["mode"], r["backend"], r["batch"], r["compiled"]) == (mode, backend or "default", b, False):
                return r.get("median_ms")
        return None

    fast = [r for r in report["rows"] if r["mode"] != "official" and not r["compiled"] and "median_ms" in r]
    best = {}
    for b in args.batches:
        cands = [r for r in fast if r["batch"] == b]
        if cands:
            best[b] = min(cands, key=lambda r: r["median_ms"])
    b0 = args.batches[0]
    default_dispatch = [r for r in fast if r["batch"] == b0 and r["backend"] == "default"]
    report["fastest_eager"] = {str(b): {"mode": r["mode"], "backend": r["backend"], "median_ms": r["median_ms"]}
                               for b, r in best.items()}
    if default_dispatch:
        r = min(default_dispatch, key=lambda r: r["median_ms"])
        report["fastest_default_dispatch"] = {"mode": r["mode"], "median_ms": r["median_ms"]}

    # 6. torch.compile
    compile_targets: list[tuple[str, str | None]] = []
    if args.compile == "on" and b0 in best:
        compile_targets.append((best[b0]["mode"], None if best[b0]["backend"] == "default" else best[b0]["backend"]))
        if (DEFAULT_REL_POS_MODE, None) not in compile_targets and DEFAULT_REL_POS_MODE in args.modes:
            compile_targets.append((DEFAULT_REL_POS_MODE, None))  # what the library uses by default
        if args.compile_official:
            compile_targets.append(("official", None))
    report["compile"] = []
    report["profiles"] = {}
    for mode, backend in compile_targets:
        if elapsed() > args.budget_s:
            report["skipped"].append(f"compile {mode} (time budget {args.budget_s:.0f}s reached)")
            continue
        torch._dynamo.reset()
        set_mode(mode)
        if args.compile_scope == "blocks":  # as --compile_sam does
            compile_image_encoder(enc, mode=args.compile_mode)
            module = enc
        else:
            module = torch.compile(enc, mode=args.compile_mode, dynamic=False)
        name = ("official" if mode == "official" else f"sdpa:{mode}") + (f" [{backend}]" if backend else "") + " +compile"
        for b in args.batches:
            if elapsed() > args.budget_s:
                report["skipped"].append(f"compile {mode} batch {b} (time budget)")
                continue
            x = inputs[b].to(dtype)
            try:
                with torch.no_grad(), backend_context(backend):
                    sync(device)
                    start = time.perf_counter()
                    module(x)
                    sync(device)
                    first_s = time.perf_counter() - start
            except Exception as err:
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                report["compile"].append({"mode": mode, "backend": backend or "default", "batch": b, "error": msg})
                report["errors"].append(traceback.format_exc()[-2000:])
                print(f"[{elapsed():6.1f}s] compile {mode} b={b}: {msg}")
                continue
            report["compile"].append({"mode": mode, "backend": backend or "default", "batch": b,
                                      "first_call_s": first_s, "scope": args.compile_scope,
                                      "compile_mode": args.compile_mode})
            print(f"[{elapsed():6.1f}s] compiled {name} b={b}: first call {first_s:.1f} s")
            row = run_row(name, mode, backend, b, module, compiled=True, compile_first_call_s=first_s)
            eager = eager_ms(mode, backend, b)
            if eager and "median_ms" in row:
                row["speedup_vs_eager"] = eager / row["median_ms"]
            if args.profile == "on" and b == b0 and "median_ms" in row:
                with torch.no_grad(), backend_context(backend):
                    report["profiles"][name] = kernel_profile(lambda: module(x), device)
        if args.compile_scope == "blocks":  # back to eager blocks for what follows
            uncompile_image_encoder(enc)
        torch._dynamo.reset()

    # 7. kernel profiles (batch 1): which kernels each default dispatch picks, where the time goes
    if args.profile == "on":
        targets = [("official", "official", None)] + [(f"sdpa:{m}", m, None) for m in args.modes]
        if b0 in best and best[b0]["backend"] != "default":
            targets.append((best[b0]["name"], best[b0]["mode"], best[b0]["backend"]))
        for label, mode, backend in targets:
            if elapsed() > args.budget_s + 20:
                report["skipped"].append(f"profile {label} (time budget)")
                continue
            set_mode(mode)
            x = inputs[b0].to(dtype)
            with torch.no_grad(), backend_context(backend):
                report["profiles"][label] = kernel_profile(lambda: enc(x), device)
    report["final_attention"] = attention_implementation(enc)
    report["wall_s"] = elapsed()

    # 8. table
    lines = print_table(report, floor_ms)
    report["table"] = lines
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


def print_table(report: dict, floor_ms: float) -> list[str]:
    peak = report["matmul_peak"]
    lines = [
        f"SAM {report['variant']} image encoder, {report['image_size']}x{report['image_size']}, {report['dtype']}, "
        f"{report['env']['device_name']}, torch {report['env']['torch']}",
        f"floor: {report['flops_per_image']['used'] / 1e12:.3f} TFLOP/image at {peak['tflops']:.0f} TFLOP/s "
        f"(measured {peak['dtype']} matmul) = {floor_ms:.2f} ms/image",
        "",
        "| variant | batch | median ms | ms/image | x official | % of floor | peak MB | max abs vs official | rel vs official | rel vs fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    official = {r["batch"]: r["median_ms"] for r in report["rows"] if r["mode"] == "official" and not r["compiled"]
                and "median_ms" in r}

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        speed = official.get(r["batch"], 0) / r["median_ms"] if official.get(r["batch"]) else None
        vo, v32 = r.get("vs_official_dtype") or {}, r.get("vs_fp32") or {}
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['median_ms']:.2f} | {r['ms_per_image']:.2f} | {f(speed, '.2f')} | "
            f"{100 * r['floor_fraction']:.0f}% | {f(r.get('peak_mem_mb'), '.0f')} | {f(vo.get('max_abs'), '.2e')} | "
            f"{f(vo.get('rel'), '.2e')} | {f(v32.get('rel'), '.2e')} |")
    if report.get("fp32_equivalence"):
        lines.append("")
        lines.append("fp32 equivalence (SDPA vs official, both float32, TF32 off): " + "; ".join(
            f"{r['mode']} max abs {r['max_abs']:.1e} rel {r['rel']:.1e}" if "max_abs" in r else f"{r['mode']} {r['error']}"
            for r in report["fp32_equivalence"]))
    for c in report.get("compile", []):
        if "first_call_s" in c:
            lines.append(f"compile ({c['scope']}, mode {c['compile_mode']}) {c['mode']} [{c['backend']}] batch {c['batch']}: "
                         f"first call {c['first_call_s']:.1f} s")
    if report.get("fastest_eager"):
        lines.append("fastest eager SDPA variant: " + "; ".join(
            f"batch {b}: {v['mode']} [{v['backend']}] {v['median_ms']:.2f} ms" for b, v in report["fastest_eager"].items()))
    if report.get("fastest_default_dispatch"):
        v = report["fastest_default_dispatch"]
        lines.append(f"fastest with the default SDPA dispatch (what use_fast_attention gets): {v['mode']} {v['median_ms']:.2f} ms")
    for label, prof in (report.get("profiles") or {}).items():
        if isinstance(prof, str):
            lines.append(f"kernels {label}: {prof}")
            continue
        top = ", ".join(f"{k['kernel'][:60]} {k['device_ms']:.2f} ms" for k in prof[1:4])
        lines.append(f"kernels {label} (total {prof[0]['total_device_ms']:.1f} ms): {top}")
    for s in report.get("skipped", []):
        lines.append(f"skipped: {s}")
    lines.append(f"total wall time {report['wall_s']:.0f} s")
    print("\n" + "\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(main())
