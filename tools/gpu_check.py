#!/usr/bin/env python
"""The user's whole path at real size, on a CUDA GPU, with time and memory per stage.

    python tools/gpu_check.py                          # Qwen2.5-VL-3B + SAM ViT-H (random weights)
    python tools/gpu_check.py --model qwen2.5-vl-7b    # Qwen2.5-VL-7B + SAM ViT-H
    python tools/gpu_check.py --tiny                   # the same stages, tiny models, on a CPU (CI)
    python tools/gpu_check.py --model qwen2.5-vl-7b --train_rows --out docs/benchmarks/DATE-GPU-train-rows.json
                                                       # issue 12's training rows, through train_ddp.py

What it does, as a user would, each entry point in its own process:

1. writes a random-weights Qwen-VL directory of the real configuration (bf16 safetensors, the
   real class, Qwen2.5-VL's shipped image-processor limits: up to 12,845,056 pixels) and an
   official-format SAM file (``torch.save`` of the fp32 state dict, as ``sam_vit_h_4b8939.pth``);
2. writes a small ReasonSeg-format dataset root of real-size photographs (4000x3000 as Mapillary,
   1920x1080, and the project's sample photos at their own sizes);
3. ``load_train`` / ``load_infer``: loads the model the way training and inference do, in a
   fresh process, and reports the peak host RSS and peak GPU memory of loading alone;
4. ``torchrun --nproc_per_node=1 train_ddp.py`` with LoRA in bf16, SIGTERM'd once it has saved a
   checkpoint, then ``--auto_resume``'d to the end (checked: the run ends at the last step);
5. ``transform_weight.py`` (merge), ``inference.py`` one-shot, ``test.py --protocol both``.

With ``--train_rows`` it runs, instead of 3-5, ``train_ddp.py`` alone at issue 12's batch (640x480
photographs x 3 questions) at batch 2, batch 2 with gradient checkpointing, then 4, 8 and 16 while
the peak stays within 80 GB, all with SAM's encoder eager (``--no-compile_sam``: the baseline, as
the 2026-11-30 rows were measured), and batch 2 again with ``--compile_sam`` (the default on CUDA).
It reads the keyed training rows (step time, best samples/s, peak memory with and without
checkpointing) from each run's ``metrics.jsonl``: the training loop's own timing (data wait
included) and ``torch.cuda.max_memory_allocated``, the first steps left out.

Per stage it records wall time, peak GPU memory (``nvidia-smi``'s device total, sampled every
0.2 s, minus the value before the stage) and peak host memory (the summed PSS of the stage's
process tree, sampled every 0.2 s; the load stages report their own exact peak, ``VmHWM``), and
writes a JSON summary and a markdown table. The working directory is deleted at the end unless
``--keep``. Random weights: the answers are nonsense; what is checked is that every stage runs,
fits and is fast enough.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
# Real-size photographs: a Mapillary-sized street photo and a full-HD frame (the project's sample
# photographs are added at their own sizes).
PHOTO_SIZES = ((4000, 3000), (1920, 1080))
QUESTION = "Where can the driver see the car speed in this image? Please output segmentation mask."
#: --train_rows: (run name, batch size, gradient checkpointing), in order; issue 12's batch is
#: 640x480 photographs x 3 questions.
TRAIN_ROW_RUNS = (("b2", 2, False), ("b2_ckpt", 2, True), ("b4", 4, False), ("b8", 8, False), ("b16", 16, False))
TRAIN_ROW_IMAGE_SIZE = (640, 480)
#: The memory a batch size must fit to count for the best samples/s (issue 12: "fits 80 GB").
TRAIN_ROW_MEMORY_LIMIT_GB = 80.0


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    gpu_peak_gb: float | None = None
    host_peak_gb: float | None = None
    ok: bool = False
    detail: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ measuring a process tree


class TreeMonitor:
    """Samples the peak host memory of a process tree and the GPU's memory in use."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.host_peak = 0
        self.gpu_peak: float | None = None
        self.gpu_start = gpu_memory_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                processes = []
            total = 0
            for process in processes:
                try:
                    info = process.memory_full_info()
                    total += getattr(info, "pss", info.rss)
                except psutil.Error:
                    continue
            self.host_peak = max(self.host_peak, total)
            used = gpu_memory_used()
            if used is not None and self.gpu_start is not None:
                self.gpu_peak = max(self.gpu_peak or 0.0, used - self.gpu_start)
            self._stop.wait(self.interval)


def gpu_memory_used() -> float | None:
    """Bytes in use on GPU 0 (all processes), from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return float(out.strip().splitlines()[0]) * 2**20
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_stage(
    name: str, command: list[str], log_dir: Path, env: dict, timeout: float, stop_when=None
) -> tuple[Stage, int]:
    """Run ``command`` as one stage; ``stop_when()`` true sends SIGTERM to it (then it must exit)."""
    stage = Stage(name)
    log_file = log_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        with TreeMonitor(process.pid) as monitor:
            signalled = False
            while process.poll() is None:
                if time.perf_counter() - started > timeout:
                    process.kill()
                    stage.detail = f"killed after {timeout:.0f} s"
                    break
                if stop_when is not None and not signalled and stop_when():
                    os.killpg(process.pid, signal.SIGTERM)  # as a cluster preempting the job does
                    signalled = True
                time.sleep(0.2)
            code = process.wait()
    stage.seconds = time.perf_counter() - started
    stage.host_peak_gb = monitor.host_peak / GB
    stage.gpu_peak_gb = None if monitor.gpu_peak is None else monitor.gpu_peak / GB
    # A preempted torchrun may report the signal in its exit code; the checkpoint is what counts.
    stage.ok = (code == 0 or signalled) and not stage.detail
    stage.extra["signalled"] = signalled
    if not stage.ok and not stage.detail:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        stage.detail = f"exit code {code}; log {log_file}:\n" + "\n".join(tail)
    return stage, code


# ------------------------------------------------------------------ the inputs


def write_vlm(spec, out: Path, device: str) -> int:
    """A random-weights Qwen-VL directory of ``spec``'s configuration, in bf16 safetensors.

    The tokenizer is the project's tiny one (its ids index the random embedding); the image
    processor carries Qwen2.5-VL's shipped limits (3,136 to 12,845,056 pixels), so the project's
    default cap is what bounds the image tokens. Returns the number of parameters.
    """
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tools.bench.param_count import build_vlm_config
    from model.processor import PROCESSOR_CLASSES, save_processor
    from model.tiny import build_tiny_tokenizer, chat_template
    from model.vlm import VLM_FAMILIES

    tokenizer = build_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = build_vlm_config(
        spec,
        text_overrides=dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id),
        **ids,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = VLM_FAMILIES[spec.family].model_class._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    count = sum(p.numel() for p in model.parameters())
    del model
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=spec.vision["patch_size"], merge_size=spec.vision["spatial_merge_size"],
        temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
    )
    processor = PROCESSOR_CLASSES[spec.family](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(spec.family)
    )
    save_processor(processor, out, spec.family)
    return count


def write_sam(variant: str, out: Path, device: str) -> None:
    """An official-format SAM file: ``torch.save`` of the fp32 state dict with the official keys."""
    import torch

    from model.sam import build_sam

    torch.manual_seed(0)
    with torch.device(device):
        sam = build_sam(variant)
    torch.save({k: v.detach().float().cpu().contiguous() for k, v in sam.state_dict().items()}, out)


def write_dataset(
    root: Path, num_train: int, num_val: int, sizes: tuple[tuple[int, int], ...] | None = None
) -> list[tuple[str, tuple[int, int]]]:
    """A ReasonSeg-format root of real-size photographs, one polygon target and three queries each.

    ``sizes``: the image sizes, in turn (default: 4000x3000, 1920x1080 and the photo's own).
    Returns (file name, size) of every image written.
    """
    import numpy as np
    from PIL import Image

    photos = sorted((REPO / "tools" / "examples").glob("*.jpg"))
    rng = np.random.default_rng(0)
    written = []
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / "reason_seg" / "ReasonSeg" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            photo = Image.open(photos[index % len(photos)]).convert("RGB")
            choices = sizes or (*PHOTO_SIZES, photo.size)
            size = choices[index % len(choices)]
            image = photo.resize(size, Image.BILINEAR)
            width, height = size
            cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
            rx, ry = rng.uniform(0.1, 0.25) * width, rng.uniform(0.1, 0.25) * height
            angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            polygon = [[float(cx + rx * math.cos(a)), float(cy + ry * math.sin(a))] for a in angles]
            name = f"{split}_{index:03d}"
            image.save(folder / f"{name}.jpg", quality=90)
            annotation = {
                "text": ["the speedometer of the car", "Where can the driver see the car speed?",
                         "the part of the picture a driver looks at to know how fast they go"],
                "is_sentence": index % 2 == 1,
                "shapes": [{"label": "target", "points": polygon}],
            }
            (folder / f"{name}.json").write_text(json.dumps(annotation))
            written.append((f"{split}/{name}.jpg", size))
    return written


# ------------------------------------------------------------------ loading alone (a child process)


def peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` (``ru_maxrss`` would carry the
    parent's peak over fork and exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_load(mode: str, version: str, vision_pretrained: str | None, precision: str) -> None:
    """Load the model as training (``train``) or inference (``infer``) does; print one JSON line."""
    import torch

    from model.loading import load_segmenter
    from utils.train_args import parse_args
    from utils.trainer import build_model, training_dtype

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context's host memory is the baseline's, not loading's
    baseline = peak_rss()
    started = time.perf_counter()
    if mode == "train":
        args = parse_args(["--version", version, "--vision_pretrained", vision_pretrained, "--precision", precision,
                           "--dataset_dir", str(Path(version).parent)])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(args, None, dtype=training_dtype(device, precision), device=device)
    else:
        model = load_segmenter(version, precision=precision)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    dtypes: dict[str, int] = {}
    for param in model.parameters():
        key = f"{str(param.dtype).removeprefix('torch.')}{'/trainable' if param.requires_grad else ''}"
        dtypes[key] = dtypes.get(key, 0) + param.numel() * param.element_size()
    peak = peak_rss()
    print("PROBE " + json.dumps({
        "seconds": seconds,
        "host_peak_bytes": peak,
        "host_baseline_bytes": baseline,
        "host_added_by_loading_bytes": peak - baseline,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "bytes_by_dtype": dtypes,
    }), flush=True)


def read_probe(log_file: Path) -> dict:
    for line in log_file.read_text(errors="replace").splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {}


# ------------------------------------------------------------------ the whole check


def last_train_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()
             if line.strip() and json.loads(line).get("kind") == "train"]
    return max(steps, default=0)


def has_checkpoint(run_dir: Path) -> bool:
    from utils.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def check(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from tools.bench.param_count import VLM_SPECS, resolve_model_name, tiny_spec

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("tools/gpu_check.py needs a CUDA GPU; --tiny runs the same stages on a CPU")
    spec = tiny_spec() if args.tiny else VLM_SPECS[resolve_model_name(args.model)]
    sam_variant = "tiny" if args.tiny else args.sam
    device = "cpu" if args.tiny else "cuda"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    python = sys.executable
    stages: list[Stage] = []
    # The tiny run keeps images small so that CI stays fast; the real run uses the default cap.
    pixels = ["--max_pixels", str(28 * 28 * 64)] if args.tiny else []
    vlm_dir, sam_file, data, runs = work / "qwen_vl", work / f"sam_{sam_variant}.pth", work / "data", work / "runs"
    merged, vis = work / "merged", work / "vis"
    run_dir = runs / "gpu_check"
    precision = "bf16"

    def timed(name: str, fn) -> Stage:
        stage = Stage(name)
        started = time.perf_counter()
        try:
            stage.extra = fn() or {}
            stage.ok = True
        except Exception as error:  # recorded in the summary; later stages are skipped
            stage.detail = f"{type(error).__name__}: {error}"
        stage.seconds = time.perf_counter() - started
        stages.append(stage)
        return stage

    def write_inputs() -> dict:
        count = write_vlm(spec, vlm_dir, device)
        write_sam(sam_variant, sam_file, device)
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.train_rows:
            images = write_dataset(data, args.num_train, 0, sizes=(TRAIN_ROW_IMAGE_SIZE,))
        else:
            images = write_dataset(data, args.num_train, args.num_val)
        return {"vlm_parameters": count, "images": [f"{name} {w}x{h}" for name, (w, h) in images]}

    if not timed("write_inputs", write_inputs).ok:
        return summarise(args, spec, stages, work)

    def stage(name: str, command: list[str], timeout: float = args.stage_timeout, **kwargs) -> Stage:
        result, _ = run_stage(name, command, logs, env, timeout, **kwargs)
        stages.append(result)
        return result

    if args.train_rows:
        base = [python, "-m", "torch.distributed.run", "--nproc_per_node", "1", "train_ddp.py",
                "--version", str(vlm_dir), "--vision_pretrained", str(sam_file), "--dataset_dir", str(data),
                "--dataset", "reason_seg", "--sample_rates", "1", "--reason_seg_data", "ReasonSeg|train",
                "--num_questions_per_image", "3", "--grad_accumulation_steps", "1", "--no_eval",
                "--steps_per_epoch", str(args.train_rows_steps), "--max_steps", str(args.train_rows_steps),
                "--save_steps", str(args.train_rows_steps), "--warmup_steps", "1", "--workers", str(args.workers),
                "--precision", precision, "--log_base_dir", str(runs), *pixels]
        measured = measure_train_rows(stage, base, runs, logs, warmup=args.train_rows_warmup,
                                      max_batch=args.train_rows_max_batch)
        return summarise(args, spec, stages, work, train_rows=measured)

    # Loading alone: what a rank holds before the first step, and what inference holds.
    load = stage("load_train", [python, __file__, "--probe", "train", "--probe_version", str(vlm_dir),
                                "--probe_sam", str(sam_file), "--probe_precision", precision])
    load.extra = read_probe(logs / "load_train.log")
    _exact_peaks(load)

    train = [python, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
             "train_ddp.py", "--version", str(vlm_dir), "--vision_pretrained", str(sam_file),
             "--dataset_dir", str(data), "--dataset", "reason_seg", "--sample_rates", "1",
             "--reason_seg_data", "ReasonSeg|train", "--val_dataset", "ReasonSeg|val",
             "--batch_size", str(args.batch_size), "--grad_accumulation_steps", "1", "--steps_per_epoch", "100",
             "--max_steps", str(args.steps), "--save_steps", str(args.save_steps), "--eval_steps", "0",
             "--warmup_steps", "1", "--workers", "2", "--precision", precision, "--log_base_dir", str(runs),
             "--exp_name", "gpu_check", "--auto_resume", *pixels]
    metrics = run_dir / "metrics.jsonl"
    first = stage("train_until_sigterm", train,
                  stop_when=lambda: last_train_step(metrics) > args.save_steps and has_checkpoint(run_dir))
    from utils.checkpoint import latest_checkpoint, read_state

    saved = latest_checkpoint(run_dir)
    first.extra["stopped_at_step"] = read_state(saved)["global_step"] if saved else 0
    log_text = (logs / "train_until_sigterm.log").read_text(errors="replace")
    if first.ok and not (first.extra["signalled"] and "SIGTERM received" in log_text):
        first.ok, first.detail = False, "the run ended before SIGTERM could be sent"
    elif first.ok and first.extra["stopped_at_step"] != last_train_step(metrics):
        first.ok, first.detail = False, (f"SIGTERM after step {last_train_step(metrics)} but the last checkpoint "
                                         f"is of step {first.extra['stopped_at_step']}")
    if not first.ok:
        return summarise(args, spec, stages, work)
    resumed = stage("train_resume", train)
    resumed.extra.update(last_step=last_train_step(metrics), train_records=_train_records(metrics))
    if resumed.ok and resumed.extra["last_step"] != args.steps:
        resumed.ok, resumed.detail = False, f"ended at step {resumed.extra['last_step']}, not {args.steps}"
    if not resumed.ok:
        return summarise(args, spec, stages, work)

    merge = stage("merge", [python, "transform_weight.py", "--ckpt", str(run_dir), "--out", str(merged),
                            "--precision", precision, "--overwrite"])
    if not merge.ok:
        return summarise(args, spec, stages, work)
    load = stage("load_infer", [python, __file__, "--probe", "infer", "--probe_version", str(merged),
                                "--probe_precision", precision])
    load.extra = read_probe(logs / "load_infer.log")
    _exact_peaks(load)

    image = sorted((data / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    infer = stage("inference", [python, "inference.py", "--version", str(merged), "--image", str(image),
                                "--prompt", QUESTION, "--vis_save_path", str(vis), "--max_new_tokens", "32",
                                "--precision", precision, *pixels])
    infer.extra = {"output": _log_tail(logs / "inference.log", 8)}
    report = work / "report.json"
    test = stage("test", [python, "test.py", "--version", str(merged), "--dataset_dir", str(data),
                          "--val_dataset", "ReasonSeg|val", "--protocol", "both", "--max_new_tokens", "32",
                          "--precision", precision, "--report", str(report), "--no_progress", *pixels])
    if report.is_file():
        test.extra = {"results": [
            {"protocol": r["protocol"], "split": r["split"], "giou": r["metrics"]["giou"], "count": r["metrics"]["count"]}
            for r in json.loads(report.read_text())["results"]
        ]}
    return summarise(args, spec, stages, work)


def train_step_figures(metrics: Path, warmup: int) -> dict:
    """A run's training loop timing from its ``metrics.jsonl``: the median step (data wait
    included) and samples/s over the steps after ``warmup``, and the peak GPU memory (GB, 10^9
    bytes) over all steps (None without CUDA)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train"]
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"{metrics}: no training step after the first {warmup}")
    step = statistics.median(r["step_seconds"] for r in timed)
    samples = statistics.median(r["samples"] for r in timed)
    peaks = [r["peak_gpu_memory_gb"] for r in records if r.get("peak_gpu_memory_gb") is not None]
    return {"step_s": step, "samples_per_s": samples / step, "peak_gb": max(peaks) if peaks else None,
            "samples_per_step": samples, "step_seconds": [r["step_seconds"] for r in timed],
            "image_tokens_mean": statistics.mean(r.get("image_tokens_mean", 0) for r in timed)}


def measure_train_rows(stage, base: list[str], runs: Path, logs: Path, warmup: int, compile_sam: bool = True,
                       max_batch: int = 16) -> dict:
    """Issue 12's training rows through ``train_ddp.py``: one run per :data:`TRAIN_ROW_RUNS`
    entry (``stage(name, command)`` runs it), larger batches while the peak is expected to fit
    :data:`TRAIN_ROW_MEMORY_LIMIT_GB`. Returns ``{"values", "details", "counts", "errors"}`` as
    :func:`tools.bench.gpu_rows.gpu_rows` takes them, and ``"runs"``: each run's figures, or why
    it has none (out of memory, skipped, failed). Those runs pass ``--no-compile_sam``: SAM's
    encoder eager, the baseline (``--compile_sam`` is on by default on CUDA). ``compile_sam``: one
    more run at batch 2 with ``--compile_sam`` (in ``"runs"`` and the step row's details, not a row
    of its own).
    ``max_batch``: larger batch sizes are not run (a card that cannot hold them)."""
    figures: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def run(name: str, batch_size: int, *flags: str) -> bool:
        """One train_ddp.py run into ``figures[name]`` (or ``errors[name]``); False: out of memory."""
        launcher, script = base[:base.index("train_ddp.py")], base[base.index("train_ddp.py"):]
        command = [*launcher, "--master_port", str(_free_port()), *script, "--batch_size", str(batch_size),
                   "--exp_name", f"train_rows_{name}", *flags]
        result = stage(f"train_rows_{name}", command)
        if not result.ok:
            log = logs / f"train_rows_{name}.log"
            out_of_memory = log.is_file() and "CUDA out of memory" in log.read_text(errors="replace")
            result.extra["out_of_memory"] = out_of_memory
            errors[name] = "out of memory" if out_of_memory else result.detail.splitlines()[0]
            return not out_of_memory
        try:
            figures[name] = result.extra["figures"] = train_step_figures(
                runs / f"train_rows_{name}" / "metrics.jsonl", warmup)
        except (OSError, ValueError, KeyError) as error:
            result.ok, result.detail = False, f"no timing: {type(error).__name__}: {error}"
            errors[name] = result.detail
        return True

    larger_plain_skipped = ""  # why larger batches without checkpointing are not run
    for name, batch_size, checkpointing in TRAIN_ROW_RUNS:
        if batch_size > max_batch:
            errors[name] = f"skipped: above --train_rows_max_batch {max_batch}"
            continue
        if not checkpointing:
            plain = sorted((b, figures[n]["peak_gb"]) for n, b, c in TRAIN_ROW_RUNS if n in figures and not c)
            if not larger_plain_skipped and len(plain) >= 2 and None not in (plain[-1][1], plain[-2][1]):
                (b0, p0), (b1, p1) = plain[-2:]  # the peak grows about linearly with the batch
                expected = p1 + (p1 - p0) * (batch_size - b1) / (b1 - b0)
                if expected > TRAIN_ROW_MEMORY_LIMIT_GB:
                    larger_plain_skipped = (f"about {expected:.0f} GB expected at batch {batch_size}, "
                                            f"over {TRAIN_ROW_MEMORY_LIMIT_GB:.0f} GB")
            if larger_plain_skipped:
                errors[name] = f"skipped: {larger_plain_skipped}"
                continue
        fitted = run(name, batch_size, "--gradient_checkpointing" if checkpointing else "--no-gradient_checkpointing",
                     "--no-compile_sam")
        if checkpointing:  # checkpointing may fit where the plain run did not: it ends nothing
            continue
        peak = figures.get(name, {}).get("peak_gb")
        if not fitted:
            larger_plain_skipped = f"batch {batch_size} ran out of memory"
        elif peak is not None and peak > TRAIN_ROW_MEMORY_LIMIT_GB:
            larger_plain_skipped = f"batch {batch_size} peaked at {peak:.0f} GB, over {TRAIN_ROW_MEMORY_LIMIT_GB:.0f} GB"
    if compile_sam and "b2" in figures:  # --compile_sam (the default on CUDA) against the eager baseline
        run("b2_compile_sam", 2, "--no-gradient_checkpointing", "--compile_sam")
    common = {"how": "train_ddp.py under torchrun --nproc_per_node=1, bf16, default LoRA + [SEG] rows, "
                     "SAM's encoder eager (--no-compile_sam; with_compile_sam_step_s: --compile_sam); "
                     "metrics.jsonl's step_seconds (data wait included) and peak_gpu_memory_gb "
                     f"(torch.cuda.max_memory_allocated), steps after the first {warmup}",
              "batch": f"{TRAIN_ROW_IMAGE_SIZE[0]}x{TRAIN_ROW_IMAGE_SIZE[1]} photographs x 3 questions",
              "floor": "tools/benchmark.py --only real_size_training counts the step's FLOPs"}
    values: dict[str, float] = {}
    details: dict[str, dict] = {}
    if "b2" in figures:
        values["gpu_train_step_b2_s"] = figures["b2"]["step_s"]
        details["gpu_train_step_b2_s"] = {**common, **figures["b2"]}
        if "b2_compile_sam" in figures:
            details["gpu_train_step_b2_s"]["with_compile_sam_step_s"] = figures["b2_compile_sam"]["step_s"]
        if figures["b2"]["peak_gb"] is not None:
            values["gpu_train_peak_gb_b2"] = figures["b2"]["peak_gb"]
            details["gpu_train_peak_gb_b2"] = {**common, **figures["b2"]}
    if "b2_ckpt" in figures and figures["b2_ckpt"]["peak_gb"] is not None:
        values["gpu_train_peak_gb_b2_ckpt"] = figures["b2_ckpt"]["peak_gb"]
        details["gpu_train_peak_gb_b2_ckpt"] = {**common, **figures["b2_ckpt"]}
    fitting = {b: figures[n]["samples_per_s"] for n, b, c in TRAIN_ROW_RUNS if n in figures and not c
               and (figures[n]["peak_gb"] or 0.0) <= TRAIN_ROW_MEMORY_LIMIT_GB}
    if fitting:
        best = max(fitting, key=fitting.get)
        values["gpu_train_samples_per_s_best"] = fitting[best]
        details["gpu_train_samples_per_s_best"] = {
            **common, "best_batch_size": best, "samples_per_s_by_batch": fitting,
            "peak_gb_by_batch": {b: figures[n]["peak_gb"] for n, b, c in TRAIN_ROW_RUNS if n in figures and not c},
            "memory_limit_gb": TRAIN_ROW_MEMORY_LIMIT_GB}
    errors_by_key = {}
    for key, run in (("gpu_train_step_b2_s", "b2"), ("gpu_train_peak_gb_b2", "b2"),
                     ("gpu_train_peak_gb_b2_ckpt", "b2_ckpt"), ("gpu_train_samples_per_s_best", "b2")):
        if key not in values and run in errors:
            errors_by_key[key] = f"run {run}: {errors[run]}"
    return {"values": values, "details": details, "counts": {}, "errors": errors_by_key,
            "runs": {"measured": figures, "not_measured": errors}}


def _exact_peaks(stage: Stage) -> None:
    """A load stage reports its own peaks (exact, not sampled)."""
    if stage.extra.get("host_peak_bytes"):
        stage.host_peak_gb = stage.extra["host_peak_bytes"] / GB
    if stage.extra.get("gpu_peak_bytes") is not None:
        stage.gpu_peak_gb = stage.extra["gpu_peak_bytes"] / GB
    if stage.ok and not stage.extra:
        stage.ok, stage.detail = False, "the probe printed no PROBE line"


def _train_records(metrics: Path) -> list[dict]:
    keep = ("step", "loss", "samples_per_second", "image_tokens_mean", "image_tokens_max")
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in metrics.read_text().splitlines() if line.strip() and json.loads(line).get("kind") == "train"]


def _log_tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) if path.is_file() else ""


def _free_port() -> int:
    from utils.distributed import free_port

    return free_port()


def machine() -> dict:
    import torch
    import transformers

    info = {"date": date.today().isoformat(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
    else:
        info["gpu"] = None
    info["cpus"] = os.cpu_count()
    return info


def summarise(args: argparse.Namespace, spec, stages: list[Stage], work: Path, train_rows: dict | None = None) -> dict:
    info = machine()
    if args.train_rows:
        # A larger batch that runs out of memory ends the sweep; it is a finding, not a failure.
        ok = train_rows is not None and "gpu_train_step_b2_s" in train_rows["values"] and all(
            s.ok or s.extra.get("out_of_memory") for s in stages)
    else:
        ok = bool(stages) and all(s.ok for s in stages) and stages[-1].name == "test"
    summary = {
        "model": spec.hf_id, "sam": "tiny" if args.tiny else args.sam, "tiny": args.tiny, "machine": info,
        "ok": ok, "stages": [asdict(s) for s in stages], "work_dir": str(work) if args.keep else None,
    }
    if train_rows is not None:
        if args.tiny or not info["gpu"]:
            summary["train_rows_code_path_check"] = {
                "note": "train_ddp.py on tiny models on this machine: a check of the code path, not GPU rows",
                **train_rows}
        else:
            from tools.bench.gpu_rows import TRAINING_KEYS, gpu_rows

            summary["gpu_rows"] = [
                row for row in gpu_rows(train_rows, None, info["gpu"], info["date"],
                                        "train_ddp.py has no published-recipe mode: this row is "
                                        "tools/benchmark.py --only real_size_training's")
                if row["key"] in TRAINING_KEYS]
    if not summary["ok"]:
        summary["failed_logs"] = {path.stem: _log_tail(path, 40) for path in sorted((work / "logs").glob("*.log"))
                                  if not any(s.ok for s in stages if s.name == path.stem)}
    return summary


def table(summary: dict) -> str:
    rows = ["| stage | time (s) | peak GPU memory (GB) | peak host memory (GB) | ok |", "| --- | ---: | ---: | ---: | --- |"]
    for s in summary["stages"]:
        gpu = "-" if s["gpu_peak_gb"] is None else f"{s['gpu_peak_gb']:.1f}"
        host = "-" if s["host_peak_gb"] is None else f"{s['host_peak_gb']:.1f}"
        rows.append(f"| {s['name']} | {s['seconds']:.1f} | {gpu} | {host} | {'yes' if s['ok'] else 'NO'} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-vl-3b", help="a published configuration (tools/bench/param_count.py)")
    p.add_argument("--sam", default="vit_h", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the stages' wiring, not a measurement")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps in all (SIGTERM after --save_steps)")
    p.add_argument("--save_steps", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--num_train", type=int, default=8)
    p.add_argument("--num_val", type=int, default=3)
    p.add_argument("--stage_timeout", type=float, default=300, help="seconds before a stage is killed")
    p.add_argument("--train_rows", action="store_true",
                   help="instead of the whole path: issue 12's training rows through train_ddp.py (see above)")
    p.add_argument("--train_rows_steps", type=int, default=10, help="--train_rows: optimizer steps per run")
    p.add_argument("--train_rows_warmup", type=int, default=3, help="--train_rows: first steps left out of the timing")
    p.add_argument("--workers", type=int, default=8, help="--train_rows: data-loader workers per run")
    p.add_argument("--train_rows_max_batch", type=int, default=16,
                   help="--train_rows: the largest batch size to run (2 for batch 2 with and without checkpointing)")
    p.add_argument("--work", help="working directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--out", default="runs/gpu_check/summary.json", help="the JSON summary")
    p.add_argument("--probe", choices=["train", "infer"], help=argparse.SUPPRESS)
    p.add_argument("--probe_version", help=argparse.SUPPRESS)
    p.add_argument("--probe_sam", help=argparse.SUPPRESS)
    p.add_argument("--probe_precision", default="bf16", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        probe_load(args.probe, args.probe_version, args.probe_sam, args.probe_precision)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = check(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{summary['model']} + SAM {summary['sam']} on {summary['machine']['gpu'] or 'CPU'}, "
          f"{summary['machine']['date']}")
    for s in summary["stages"]:
        if not s["ok"]:
            print(f"FAILED {s['name']}: {s['detail']}")
    print(table(summary))
    if summary.get("gpu_rows"):
        from tools.bench.gpu_rows import format_gpu_table

        print()
        print(format_gpu_table(summary["gpu_rows"]))
    elif summary.get("train_rows_code_path_check"):
        runs = summary["train_rows_code_path_check"]["runs"]
        for name, figures in runs["measured"].items():
            print(f"{name}: {figures['step_s']:.3f} s a step, {figures['samples_per_s']:.2f} samples/s (tiny models, "
                  "a code-path check)")
        for name, why in runs["not_measured"].items():
            print(f"{name}: {why}")
    print(f"summary: {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
