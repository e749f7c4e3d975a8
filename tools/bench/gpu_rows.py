"""The keyed GPU rows of issues 11 (inference) and 12 (training): what each row is, its goal, the
hardware peaks that set its floor, and the JSON row.

Every row of the report's ``gpu_rows`` carries::

    key, what, unit, value, status, goal {direction, value, text}, floor, floor_basis, met,
    check, check_passed, before, issue, gpu, date, details

``value`` is measured at real size (Qwen2.5-VL-7B + SAM ViT-H, random weights, bf16) on CUDA by
:mod:`tools.bench.real_size`, or ``None`` with ``status = "not measured"``: on a machine without
CUDA the rows are present and empty, never estimated. ``floor`` (time rows) is the row's bytes or
FLOPs divided by the copy bandwidth and bf16 matmul rate measured at the start of the run
(:func:`measure_peaks`); ``met`` is :func:`goal_met` of value and goal (``None`` when not measured).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Goal:
    """``value direction goal``: direction "<=" (lower is better) or ">=" (higher is better)."""

    direction: str
    value: float

    def text(self, unit: str) -> str:
        return f"{self.direction} {self.value:g}{'x' if unit == 'x' else ' ' + unit}"


@dataclass(frozen=True)
class GpuRow:
    key: str
    issue: int
    what: str
    unit: str
    goal: Goal
    #: the figure measured on 2026-11-29 on an H200 at 2a7d9a6, before the fast paths (README, Performance)
    before: str


#: In the issues' order. Inference: issue 11; training: issue 12.
GPU_ROWS: tuple[GpuRow, ...] = (
    GpuRow("gpu_decode_ms_per_token", 11, "one decoded token, batch 1", "ms", Goal("<=", 5), "20-23 ms"),
    GpuRow("gpu_request_32_s", 11, "one request, 32 new tokens, 1 mask, preprocessing included", "s",
           Goal("<=", 0.30), "1.23 s"),
    GpuRow("gpu_request_128_vs_published", 11, "128 new tokens: published way / ours", "x", Goal(">=", 5), "0.88x"),
    GpuRow("gpu_followup_speedup", 11, "same image, next question: request 1 / requests 2-5", "x",
           Goal(">=", 3), "1.36x"),
    GpuRow("gpu_sam_encode_ms", 11, "SAM ViT-H encoder, one 1024x1024 image", "ms", Goal("<=", 10), "44 ms"),
    GpuRow("gpu_prefill_ms", 11, "vision tower + language model over the prompt", "ms", Goal("<=", 30), "82 ms"),
    GpuRow("gpu_batched_8_speedup", 11, "8 requests of 32 tokens: one at a time / one batch", "x",
           Goal(">=", 8), "5.0x"),
    GpuRow("gpu_train_step_b2_s", 12, "training step, batch 2, no gradient checkpointing", "s",
           Goal("<=", 0.15), "0.38-0.50 s"),
    GpuRow("gpu_train_samples_per_s_best", 12, "samples/s at the best batch size that fits 80 GB", "samples/s",
           Goal(">=", 20), "6.5"),
    GpuRow("gpu_train_peak_gb_b2", 12, "peak memory, batch 2, no checkpointing", "GB", Goal("<=", 26), "33.0 GB"),
    GpuRow("gpu_train_peak_gb_b2_ckpt", 12, "peak memory, batch 2, gradient checkpointing", "GB",
           Goal("<=", 22), "27.8 GB"),
    GpuRow("gpu_train_vs_published_step", 12, "step time, the published way / ours", "x", Goal(">=", 3),
           "1.25x (both with checkpointing)"),
)
GPU_ROW_KEYS: tuple[str, ...] = tuple(row.key for row in GPU_ROWS)
INFERENCE_KEYS = tuple(row.key for row in GPU_ROWS if row.issue == 11)
TRAINING_KEYS = tuple(row.key for row in GPU_ROWS if row.issue == 12)
BEFORE = "measured 2026-11-29 on one NVIDIA H200 at 2a7d9a6, before the fast paths (README, Performance)"
NOT_MEASURED = "not measured"


def goal_met(value: float | None, goal: Goal) -> bool | None:
    """Whether ``value`` meets ``goal`` (None when there is no value)."""
    if value is None:
        return None
    if goal.direction == "<=":
        return bool(value <= goal.value)
    if goal.direction == ">=":
        return bool(value >= goal.value)
    raise ValueError(f"unknown goal direction {goal.direction!r}")


# ---------------------------------------------------------------------------------------------
# The hardware's peaks and the floors they set
# ---------------------------------------------------------------------------------------------


def _event_seconds(fn, calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / calls


def measure_peaks(device: torch.device, copy_bytes: int = 2 << 30, matmul_size: int = 8192) -> dict[str, Any]:
    """The copy bandwidth (bytes read + written per second) of a ``copy_bytes`` device-to-device
    copy and the bf16 matmul rate (FLOP/s) of two ``matmul_size`` square matrices: the best of 3
    trials of 10 calls each after a warm-up, timed with CUDA events."""
    source = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    a = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device=device)
    copy = lambda: target.copy_(source)  # noqa: E731
    matmul = lambda: torch.mm(a, b)  # noqa: E731
    for fn in (copy, matmul):
        fn()
    torch.cuda.synchronize(device)
    copy_s = min(_event_seconds(copy, 10) for _ in range(3))
    matmul_s = min(_event_seconds(matmul, 10) for _ in range(3))
    source = target = a = b = None  # free them before the measurements
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * copy_bytes / copy_s,
        "bf16_matmul_flop_per_s": 2 * matmul_size**3 / matmul_s,
        "how": f"a {copy_bytes / 2**30:g} GiB device copy (read + write) and a {matmul_size}^3 bf16 matmul, "
               "best of 3 x 10 calls, CUDA events",
    }


def decode_weight_bytes(vlm: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: the language model and the LM head (the vision
    tower and the input embedding, of which one row is read, left out; shared tensors once)."""
    embedding = vlm.get_input_embeddings().weight
    head = vlm.get_output_embeddings().weight
    seen, total = set(), 0
    for name, param in vlm.named_parameters(remove_duplicate=False):
        if id(param) in seen or "visual" in name.split("."):
            continue
        if param is embedding and head is not embedding:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def grouped_query_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a forward ``scaled_dot_product_attention`` whose keys and values may have fewer
    heads than the queries (``enable_gqa``, as transformers calls it for an unmasked Qwen-VL
    prompt): as with the key and value heads repeated. torch 2.11's own formula refuses the shapes."""
    from torch.utils.flop_counter import sdpa_flop_count

    batch, heads = query_shape[:2]
    return sdpa_flop_count(query_shape, (batch, heads, *key_shape[2:]), (batch, heads, *value_shape[2:]))


def count_flops(fn) -> tuple[int, Any]:
    """(FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, result) of one call."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    sdpa_ops = (aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
                aten._scaled_dot_product_cudnn_attention)
    counter = FlopCounterMode(display=False, custom_mapping={op: grouped_query_sdpa_flops for op in sdpa_ops})
    with counter:
        result = fn()
    return int(counter.get_total_flops()), result


def floors(measured: dict[str, Any], peaks: dict[str, float] | None) -> dict[str, tuple[float, str]]:
    """Per key, (floor in the row's unit, how it is computed), from the bytes and FLOPs the
    measurement counted (``measured["counts"]``) and the measured peaks; empty without peaks."""
    if not peaks:
        return {}
    counts = measured.get("counts", {})
    bandwidth, rate = peaks["copy_bytes_per_s"], peaks["bf16_matmul_flop_per_s"]
    bw_text, rate_text = f"{bandwidth / 1e12:.2f} TB/s", f"{rate / 1e12:.0f} TFLOP/s"
    out: dict[str, tuple[float, str]] = {}
    decode = prefill = sam = None
    if "decode_weight_bytes" in counts:
        decode = counts["decode_weight_bytes"] / bandwidth
        out["gpu_decode_ms_per_token"] = (
            1e3 * decode, f"{counts['decode_weight_bytes'] / 1e9:.1f} GB of weights per token / {bw_text}")
    if "prefill_flops" in counts:
        prefill = counts["prefill_flops"] / rate
        out["gpu_prefill_ms"] = (1e3 * prefill, f"{counts['prefill_flops'] / 1e12:.1f} TFLOP / {rate_text}")
    if "sam_encode_flops" in counts:
        sam = counts["sam_encode_flops"] / rate
        out["gpu_sam_encode_ms"] = (1e3 * sam, f"{counts['sam_encode_flops'] / 1e12:.2f} TFLOP / {rate_text}")
    if None not in (decode, prefill, sam):
        tokens = counts.get("request_new_tokens", 32)
        out["gpu_request_32_s"] = (prefill + tokens * decode + sam,
                                   f"prefill + {tokens} decoded tokens + SAM encoder floors")
    if "train_step_b2_flops" in counts:
        out["gpu_train_step_b2_s"] = (
            counts["train_step_b2_flops"] / rate, f"{counts['train_step_b2_flops'] / 1e12:.1f} TFLOP / {rate_text}")
    return out


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def gpu_rows(
    measured: dict[str, Any] | None = None,
    peaks: dict[str, float] | None = None,
    gpu_name: str | None = None,
    date: str | None = None,
    reason: str = "no CUDA device",
) -> list[dict[str, Any]]:
    """Every keyed GPU row, in the issues' order.

    Args:
        measured: ``{"values": {key: value}, "details": {key: {...}}, "counts": {...}}`` from
            :mod:`tools.bench.real_size` on CUDA at real size; None (or a key missing): the row
            is "not measured" with ``reason``.
        peaks: :func:`measure_peaks` (sets the floors).
    """
    measured = measured or {}
    values, details = measured.get("values", {}), measured.get("details", {})
    errors = measured.get("errors", {})
    floor = floors(measured, peaks)
    date = date or datetime.date.today().isoformat()
    rows = []
    for spec in GPU_ROWS:
        value = values.get(spec.key)
        if value is not None:
            status = "measured"
        elif spec.key in errors:
            status = f"failed: {errors[spec.key]}"
        else:
            status = NOT_MEASURED
        floor_value, floor_basis = floor.get(spec.key, (None, None))
        rows.append({
            "key": spec.key,
            "what": spec.what,
            "unit": spec.unit,
            "value": value,
            "status": status,
            "goal": {"direction": spec.goal.direction, "value": spec.goal.value, "text": spec.goal.text(spec.unit)},
            "floor": floor_value if value is not None else None,
            "floor_basis": floor_basis if value is not None else None,
            "met": goal_met(value, spec.goal),
            "check": details.get(spec.key, {}).get("check") if value is not None else None,
            "check_passed": details.get(spec.key, {}).get("check_passed") if value is not None else None,
            "before": f"{spec.before} ({BEFORE})",
            "issue": spec.issue,
            "gpu": gpu_name if value is not None else None,
            "date": date,
            "details": details.get(spec.key, {}) if value is not None else {"reason": errors.get(spec.key, reason)},
        })
    return rows


def gpu_slug(name: str | None) -> str:
    """A file-name part for a GPU's name: "NVIDIA H200" -> "h200"; "cpu" without one."""
    if not name:
        return "cpu"
    text = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "gpu"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:,.0f} {unit}"


def format_gpu_table(rows: list[dict[str, Any]]) -> str:
    """The keyed rows as a markdown table."""
    lines = ["| key | what | value | goal | floor | met | status |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        met = "-" if row["met"] is None else "yes" if row["met"] else "no"
        lines.append(f"| `{row['key']}` | {row['what']} | {_fmt(row['value'], row['unit'])} | {row['goal']['text']} | "
                     f"{_fmt(row['floor'], row['unit'])} | {met} | {row['status']} |")
    return "\n".join(lines)
