#!/usr/bin/env python
"""Where the time of a real-size request and training step goes: torch.profiler on CUDA.

    python tools/gpu_profile.py --out docs/benchmarks/DATE-GPU-profile.json   # Qwen2.5-VL-7B + SAM ViT-H
    python tools/gpu_profile.py --tiny --device cpu --out /tmp/profile.json    # the same code, a CPU check

The keyed rows of issues 11 and 12 (``tools/benchmark.py --only real_size``) say how long; this
says why. Each profiled call (after warm-up calls, so compiles and CUDA-graph recordings are not
in it) reports its wall time, the GPU's kernel time (the sum of every kernel's device time, CUDA
graphs included), the kernel launches and graph replays the host issued, and the kernels and host
operators that take the most time. A call whose kernel time is far below its wall time is bound by
the host (launches, Python); one whose kernel time is near its wall time is bound by the kernels,
and the top kernels say which. The calls:

* ``request_32`` / ``request_128``: ``ReasonSegmenter.predict`` of one 640x480 image with 32 and
  128 new tokens (the default decoding: compiled on CUDA). Their difference over 96 tokens is one
  decoded token (``per_decoded_token``).
* ``prefill``: one forward of the VLM over the prompt (vision tower included).
* ``sam_encode``: SAM's image encoder, one image, eager (the default of a one-shot request).
* ``train_step_b2``: our training step (LoRA + ``[SEG]`` rows, bf16 autocast, AdamW) at batch 2 x
  3 questions, no gradient checkpointing, as ``tools/bench/real_size.py`` measures it.

Random weights, built on the device in about a second (``tools.bench.real_size``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

#: Host calls that put work on the GPU: kernel launches, CUDA-graph replays, copies and fills.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")
TOP = 12


def _self_device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profiled(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> dict[str, Any]:
    """One call of ``fn`` under torch.profiler, after ``warmup`` calls; see the module docstring."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    launches = {name: 0 for name in LAUNCH_CALLS}
    for event in averages:
        if event.key in launches:
            launches[event.key] += event.count
    # The device's own records (kernels, copies, fills), not the host operators that launched them
    # (whose device time counts the same kernels again).
    on_device = [e for e in averages if e.device_type == DeviceType.CUDA]
    kernels = sorted(on_device, key=_self_device_us, reverse=True)
    host = sorted((e for e in averages if e.device_type == DeviceType.CPU and e.key not in launches),
                  key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": 1e3 * wall,
        "gpu_kernel_ms": sum(_self_device_us(e) for e in on_device) / 1e3,
        "launches": {name: count for name, count in launches.items() if count},
        "launch_total": sum(launches.values()),
        "top_device": [{"name": e.key[:120], "count": e.count, "ms": _self_device_us(e) / 1e3} for e in kernels[:TOP]],
        "top_host": [{"name": e.key[:120], "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                     for e in host[:TOP]],
    }


def per_token(long: dict[str, Any], short: dict[str, Any], tokens: int) -> dict[str, float]:
    """One decoded token: the difference of two requests that differ only in their length."""
    return {
        "wall_ms": (long["wall_ms"] - short["wall_ms"]) / tokens,
        "gpu_kernel_ms": (long["gpu_kernel_ms"] - short["gpu_kernel_ms"]) / tokens,
        "launches": (long["launch_total"] - short["launch_total"]) / tokens,
    }


def profile_inference(spec, sam_variant: str, device: torch.device, say) -> dict[str, Any]:
    from model.batch import vlm_inputs
    from tools.bench.common import (
        QUESTIONS, answer_script, default_qwen25_processor, free_memory, request_batch, scene, scripted,
    )
    from tools.bench.real_size import build_real_size_segmenter
    from utils.trainer import training_dtype

    dtype = training_dtype(device, "bf16")
    processor = default_qwen25_processor()
    model = build_real_size_segmenter(spec, sam_variant, device, dtype, processor)
    model.cast_for_run(dtype, trainable_dtype=dtype).eval()
    image, question = scene(40)[0], QUESTIONS[0]
    out: dict[str, Any] = {}
    try:
        for tokens in (32, 128):
            say(f"  request_{tokens} ...")
            ids = answer_script(processor.tokenizer, tokens, model.seg_token_id, num_seg=1)
            out[f"request_{tokens}"] = profiled(
                lambda: model.predict([image], [question], max_new_tokens=tokens, logits_processor=scripted(ids)), device)
        out["per_decoded_token"] = per_token(out["request_128"], out["request_32"], 96)
        batch = request_batch(model, [image], [question])
        inputs = vlm_inputs(batch)
        with torch.no_grad():
            say("  prefill ...")
            out["prefill"] = profiled(lambda: model.vlm(**inputs, use_cache=True, logits_to_keep=1), device)
            say("  sam_encode ...")
            pixels, sizes = batch["sam_pixel_values"][:1], batch["sam_input_size"][:1]
            out["sam_encode"] = profiled(lambda: model.encode_images(pixels, sizes), device)
    finally:
        model = None  # the lambdas above hold it through this name
        free_memory(device)
    return out


def profile_training(spec, sam_variant: str, device: torch.device, say) -> dict[str, Any]:
    from tools.bench.common import default_qwen25_processor
    from tools.bench.real_size import build_for_training
    from tools.bench.training import train_step, training_batch
    from utils.optim import build_optimizer
    from utils.trainer import training_dtype

    dtype = training_dtype(device, "bf16")
    autocast = dtype if device.type == "cuda" else None
    model = build_for_training(spec, sam_variant, device, dtype, default_qwen25_processor(), published=False)
    optimizer = build_optimizer(model, 3e-4, 0.0, (0.9, 0.95))
    batch = training_batch(model, 0, batch_size=2, turns=3)
    say("  train_step_b2 ...")
    return {"train_step_b2": profiled(lambda: train_step(model, optimizer, batch, autocast), device)}


def summary_table(report: dict[str, Any]) -> str:
    lines = ["| call | wall (ms) | GPU kernels (ms) | launches | top kernel |", "| --- | ---: | ---: | ---: | --- |"]
    for name, part in report["calls"].items():
        if "top_device" in part:
            top = part["top_device"][0] if part["top_device"] else {"name": "-", "ms": 0.0}
            lines.append(f"| {name} | {part['wall_ms']:.1f} | {part['gpu_kernel_ms']:.1f} | {part['launch_total']} | "
                         f"{top['name'][:60]} ({top['ms']:.1f} ms) |")
        else:
            lines.append(f"| {name} | {part['wall_ms']:.2f} | {part['gpu_kernel_ms']:.2f} | {part['launches']:.0f} | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2.5-VL + SAM config (a check of the code)")
    parser.add_argument("--only", choices=["inference", "training"], default=None, help="one half")
    parser.add_argument("--out", default="", help="write the JSON report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (--device cpu --tiny checks the code)")
    if not args.tiny and device.type != "cuda":
        parser.error("real size needs --device cuda; add --tiny for a CPU check")
    from tools.bench.param_count import tiny_spec
    from tools.bench.real_size import real_spec

    spec, sam_variant = (tiny_spec(), "tiny") if args.tiny else (real_spec(), "vit_h")
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "model": f"{spec.hf_id.split('/')[-1]} + SAM {sam_variant}, random weights",
        "command": "python tools/gpu_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "calls": {},
        "errors": {},
    }

    def write() -> None:
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    for half, fn in (("inference", profile_inference), ("training", profile_training)):
        if args.only not in (None, half):
            continue
        say(f"profiling {half} ...")
        try:
            report["calls"].update(fn(spec, sam_variant, device, say))
        except Exception as error:  # noqa: BLE001 - one half failing must not lose the other
            report["errors"][half] = f"{type(error).__name__}: {error}"
            say(f"  {half} failed: {report['errors'][half]}")
        write()
    print(summary_table(report))
    for name, part in report["calls"].items():
        for kind in ("top_device", "top_host"):
            if part.get(kind):
                print(f"\n{name}, {kind}:")
                for row in part[kind][:8]:
                    print(f"  {row.get('ms', row.get('self_cpu_ms')):8.2f} ms  x{row['count']:<5} {row['name'][:100]}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
