"""Running the benchmarks and writing the report (``tools/benchmark.py`` is the command).

The report holds ``rows`` (the side-by-side table, :class:`~tools.bench.common.BenchRow`) and
``gpu_rows`` (the keyed rows of issues 11 and 12, :mod:`tools.bench.gpu_rows`): always all of
them, "not measured" unless this run measured them at real size on CUDA.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .common import BENCHMARK_GROUPS, BENCHMARKS, BenchRow, BenchSettings, build_segmenter, free_memory
from .generation import bench_batched, bench_generation, bench_repeated_image
from .gpu_rows import gpu_rows, gpu_slug, measure_peaks
from .training import bench_data_loading, bench_ddp, bench_params, bench_preprocessing, bench_training_step

REAL_SIZE = BENCHMARK_GROUPS["real_size"]


def machine_info(settings: BenchSettings) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": settings.device,
    }
    if settings.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def expand(only: Sequence[str]) -> list[str]:
    """Benchmark names with groups (``real_size``) expanded, in table order."""
    names = {part for name in only for part in BENCHMARK_GROUPS.get(name, (name,))}
    unknown = sorted(names - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {', '.join([*BENCHMARKS, *BENCHMARK_GROUPS])}")
    return [name for name in BENCHMARKS if name in names]


def model_description(settings: BenchSettings, selected: Sequence[str]) -> str:
    """The models the report's figures come from: the tiny Qwen2.5-VL of the side-by-side rows
    and, where they ran, the real-size (or tiny-config) models of the keyed GPU rows."""
    tiny = (f"tiny Qwen2.5-VL (model.tiny.build_tiny_vlm), text hidden {settings.hidden_size}, "
            f"{settings.num_layers} layers, random weights")
    real = {"real": "Qwen2.5-VL-7B + SAM ViT-H, random weights, bf16",
            "tiny": "the real-size code on a tiny Qwen2.5-VL + SAM config (a code-path check)"}.get(settings.real_size)
    parts = ([tiny] if any(name not in REAL_SIZE for name in selected) else []) + (
        [f"keyed GPU rows: {real}"] if real and set(selected) & set(REAL_SIZE) else [])
    return "; ".join(parts) or tiny


def run_benchmarks(
    settings: BenchSettings,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the selected benchmarks (all of :data:`BENCHMARKS` by default; the real-size ones only
    with ``settings.real_size``) and return the report.

    ``on_part(report)`` is called after each benchmark with the report so far (``"complete":
    False``), so that a run stopped by a time limit keeps what it measured."""
    selected = expand(only) if only else [name for name in BENCHMARKS if name not in REAL_SIZE or settings.real_size]
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    if set(selected) & set(REAL_SIZE) and not settings.real_size:
        settings.real_size = "real" if settings.device == "cuda" else "tiny"
    if settings.real_size == "real" and settings.device != "cuda":
        raise RuntimeError("real-size figures need --device cuda (use --real_size_config tiny to check the code path)")
    scratch_holder = None
    if settings.scratch:
        scratch = Path(settings.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    else:
        scratch_holder = tempfile.TemporaryDirectory(prefix="benchmark_")
        scratch = Path(scratch_holder.name)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone()
    start_info = machine_info(settings)
    gpu_name = start_info.get("gpu")
    peaks = None
    if settings.device == "cuda":
        say("measuring the GPU's copy bandwidth and bf16 matmul rate ...")
        peaks = measure_peaks(settings.torch_device)
        say(f"  {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s, {peaks['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    rows: list[BenchRow] = []
    measured: dict[str, Any] = {"values": {}, "details": {}, "counts": {}, "errors": {}}
    code_path_check: dict[str, Any] = {}
    durations: dict[str, float] = {}
    shared_model = None

    def assemble(complete: bool) -> dict[str, Any]:
        """The report of what has run so far."""
        if settings.real_size == "real":
            reason = "not selected in this run (--only)" if complete else "not reached yet (a partial report)"
        elif settings.device != "cuda":
            reason = "no CUDA device: GPU rows are measured with --device cuda, never estimated"
        else:
            reason = "real-size rows not run (--real_size_config)"
        report = {
            "date": date.isoformat(timespec="seconds"),
            "complete": complete,
            "settings": asdict(settings),
            "model": model_description(settings, selected),
            "machine": start_info,
            "load_average_end": machine_info(settings)["load_average"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "seconds": time.perf_counter() - started,
            "benchmarks": selected,
            "seconds_by_benchmark": dict(durations),
            "rows": [row.to_dict() for row in rows],
            "gpu": {"name": gpu_name, "peaks": peaks},
            "gpu_rows": gpu_rows(measured, peaks, gpu_name, date.date().isoformat(), reason),
        }
        if code_path_check:
            report["real_size_code_path_check"] = {
                "note": "the real-size code run on a tiny configuration on this device: a check of the code path, "
                        "not GPU figures (the GPU rows stay 'not measured')", **code_path_check}
        return report

    def real_size_update(part: dict[str, Any]) -> None:
        """A real-size row measured: into the report on disk at once (a part takes minutes)."""
        if settings.real_size == "real" and on_part is not None:
            for field in measured:
                measured[field].update(part[field])
            on_part(assemble(complete=False))

    try:
        for name in selected:
            say(f"running {name} ...")
            begin = time.perf_counter()
            torch.manual_seed(settings.seed)
            new: list[BenchRow] = []
            if name in ("generation", "batched"):
                if shared_model is None:
                    shared_model = build_segmenter(settings.hidden_size, settings.num_layers, "tiny", seed=settings.seed)
                new = (bench_generation if name == "generation" else bench_batched)(settings, shared_model)
            elif name == "repeated_image":
                new = bench_repeated_image(settings)
            elif name == "training_step":
                new = bench_training_step(settings)
            elif name == "params":
                new = bench_params(settings)
            elif name == "ddp":
                new = bench_ddp(settings, scratch)
            elif name == "preprocessing":
                new = bench_preprocessing(settings)
            elif name == "data_loading":
                new = bench_data_loading(settings, scratch)
            else:
                part = run_real_size(name, settings, say, on_update=real_size_update)
                if settings.real_size == "real":
                    for field in measured:
                        measured[field].update(part[field])
                else:
                    code_path_check[name] = part
            durations[name] = time.perf_counter() - begin
            for row in new:
                row.details["benchmark"] = name
                say(format_row_line(row))
            rows.extend(new)
            free_memory(settings.torch_device)
            if on_part is not None and name != selected[-1]:
                on_part(assemble(complete=False))
    finally:
        if scratch_holder is not None:
            scratch_holder.cleanup()
    return assemble(complete=True)


def run_real_size(
    name: str, settings: BenchSettings, say: Callable[[str], None],
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One real-size part (``real_size_inference`` or ``real_size_training``): Qwen2.5-VL-7B + SAM
    ViT-H on CUDA, or the same code on a tiny configuration (``settings.real_size == "tiny"``).
    ``on_update(measured so far)`` after each of its measurements."""
    from .real_size import measure_inference, measure_training

    spec, sam_variant = None, "vit_h"
    if settings.real_size == "tiny":
        from .param_count import tiny_spec

        spec, sam_variant = tiny_spec(), "tiny"
    measure = measure_inference if name == "real_size_inference" else measure_training
    return measure(settings, spec=spec, sam_variant=sam_variant, say=say, on_update=on_update)


def default_report_name(report: dict[str, Any]) -> str:
    """``YYYY-MM-DD-<gpu>.json`` (e.g. ``2026-12-01-h200.json``), as under docs/benchmarks/; a run
    of one real-size half adds its name (``2026-12-01-h200-real_size_training.json``), so that the
    two halves run apart do not overwrite each other."""
    halves = [name for name in report.get("benchmarks", ()) if name in REAL_SIZE]
    part = f"-{halves[0]}" if len(halves) == 1 else ""
    return f"{report['date'][:10]}-{gpu_slug(report['gpu']['name'])}{part}.json"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _met_text(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "no"


def format_row_line(row: BenchRow) -> str:
    ratio = row.ratio
    return (f"{row.name}: ours {fmt(row.ours)} {row.unit}, baseline {fmt(row.baseline)}, ratio {_ratio_text(ratio)}, "
            f"goal {row.goal} -> {_met_text(row.met)}; check {'ok' if row.check_passed else 'FAILED' if row.check_passed is False else '-'}")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_table(report: dict[str, Any]) -> str:
    """The report's side-by-side rows as a markdown table (the keyed GPU rows: :func:`format_gpu_table`)."""
    lines = [
        "| measurement | ours | baseline | unit | baseline / ours | goal | met | check |",
        "| --- | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for row in report["rows"]:
        status = "ok" if row["check_passed"] else "FAILED" if row["check_passed"] is False else "-"
        lines.append(
            f"| {_cell(row['name'])} | {fmt(row['ours'])} | {fmt(row['baseline'])} | {row['unit']} | "
            f"{_ratio_text(row['ratio'])} | {_cell(row['goal'])} | {_met_text(row['met'])} | {status}: {_cell(row['check'])} |"
        )
    return "\n".join(lines)


def format_sides(report: dict[str, Any]) -> str:
    """What each side of each row is (for the README)."""
    seen, lines = set(), []
    for row in report["rows"]:
        key = (row["details"].get("benchmark"), row["ours_is"], row["baseline_is"])
        if key in seen:
            continue
        seen.add(key)
        baseline = f"; baseline: {row['baseline_is']}" if row["baseline_is"] else ""
        lines.append(f"- {row['name']}: ours: {row['ours_is']}{baseline}")
    return "\n".join(lines)
