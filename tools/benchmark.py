#!/usr/bin/env python
"""Speed and memory of this project side by side with the published approach (LISA / VLMSAM).

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--out report.json | --out DIR/]

Prints markdown tables and writes a JSON report: ``rows`` (the side-by-side table: name, ours,
baseline, unit, ratio, goal, ...) and ``gpu_rows`` (the keyed rows of issues 11 and 12: key,
value, goal, floor, met, GPU, date; "not measured" without CUDA, never estimated). Every
comparison runs both sides in this process on the same model and inputs, interleaved, several
times, and reports medians; ``ratio = baseline / ours`` (every compared quantity is
lower-is-better: seconds, ms per sample, bytes). Each row carries a correctness check (both sides
give the same [SEG] states and masks, or the same loss). The harness is tools/bench/.

Examples::

    python tools/benchmark.py --quick                      # the CPU table, a few minutes
    python tools/benchmark.py --out runs/benchmark.json    # more repetitions
    python tools/benchmark.py --device cuda --only real_size --out docs/benchmarks/
                                # the keyed GPU rows, Qwen2.5-VL-7B + SAM ViT-H, to docs/benchmarks/DATE-GPU.json
    python tools/benchmark.py --only generation,params --smoke   # a seconds-long structural check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.bench.common import BENCHMARK_GROUPS, BENCHMARKS, BenchSettings  # noqa: E402
from tools.bench.gpu_rows import format_gpu_table  # noqa: E402
from tools.bench.report import default_report_name, format_sides, format_table, run_benchmarks  # noqa: E402

CHOICES = (*BENCHMARKS, *BENCHMARK_GROUPS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 5 minutes on a 2-core CPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="minimal sizes (4/8 tokens, 1 repetition, tiny SAM): checks the machinery, not the speed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", help="write the JSON report here; a directory (an existing one, or a path ending "
                        "in /) gets YYYY-MM-DD-<gpu>.json, e.g. --out docs/benchmarks/ after a GPU run. It is "
                        "rewritten after each benchmark (\"complete\": false until the end), so a run stopped by a "
                        "time limit keeps what it measured")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CHOICES)} "
                        "(real_size = real_size_inference,real_size_training)")
    parser.add_argument("--hidden_size", type=int, default=256, help="text hidden size of the tiny Qwen2.5-VL")
    parser.add_argument("--num_layers", type=int, default=4, help="text layers of the tiny Qwen2.5-VL")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (1: both sides alike, no oversubscription on a shared machine)")
    parser.add_argument("--real_size_config", choices=["auto", "real", "tiny", "none"], default="auto",
                        help="the keyed GPU rows: 'real' = Qwen2.5-VL-7B + SAM ViT-H (CUDA), 'tiny' = the same "
                        "code on a tiny config (a CPU check; the GPU rows stay 'not measured'); auto: real on "
                        "--device cuda, none on cpu")
    parser.add_argument("--scratch", default="", help="directory for generated files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(CHOICES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(CHOICES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    real_size = {"auto": "real" if args.device == "cuda" else "", "none": ""}.get(args.real_size_config,
                                                                                    args.real_size_config)
    settings = BenchSettings(
        device=args.device, quick=args.quick, smoke=args.smoke, hidden_size=args.hidden_size,
        num_layers=args.num_layers, threads=args.threads, scratch=args.scratch, real_size=real_size, seed=args.seed,
    )
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()

    def write(report: dict) -> Path:
        report["command"] = command.strip()
        out = Path(args.out)
        if out.is_dir() or args.out.endswith(("/", os.sep)):
            out = out / default_report_name(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        partial.replace(out)  # a run stopped mid-write leaves the last whole report
        return out

    report = run_benchmarks(settings, args.only, progress=lambda message: print(message, file=sys.stderr, flush=True),
                            on_part=write if args.out else None)
    report["command"] = command.strip()
    table = format_table(report)
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['cpu_count']}-core CPU, no GPU"
    if report["rows"]:
        print(table)
        print()
    print(format_gpu_table(report["gpu_rows"]))
    print()
    print(f"{report['model']}; {where}; torch {machine['torch']}, {machine['torch_threads']} thread(s); "
          f"load average at start {', '.join(f'{x:.1f}' for x in machine['load_average'] or [])}; "
          f"{report['date']}; {time.perf_counter() - started:.0f} s")
    print(f"command: {report['command']}")
    print()
    print(format_sides(report))
    if args.out:
        print(f"\nwrote {write(report)}", file=sys.stderr)
    failed = [row["name"] for row in report["rows"] if row["check_passed"] is False]
    failed += [row["key"] for row in report["gpu_rows"] if row["check_passed"] is False]
    for part in report.get("real_size_code_path_check", {}).values():
        if isinstance(part, dict):
            failed += [f"{key} (tiny config)" for key, details in part["details"].items()
                       if details.get("check_passed") is False]
    if failed:
        print(f"correctness check FAILED: {', '.join(failed)}", file=sys.stderr)
    errors = [row["key"] for row in report["gpu_rows"] if row["status"].startswith("failed")]
    for part in report.get("real_size_code_path_check", {}).values():
        if isinstance(part, dict):
            errors += [f"{key} (tiny config): {text}" for key, text in part["errors"].items()]
    if errors:
        print(f"measurement FAILED: {'; '.join(errors)}", file=sys.stderr)
    return 1 if (failed or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
