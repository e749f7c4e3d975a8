"""tools/benchmark.py and its harness (tools/bench/): the report's structure, the ratios, the keyed
GPU rows, and that both sides of every comparison compute the same thing. No timing thresholds here."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from model.vlm import LoraSettings
from tools.bench.common import BenchRow, BenchSettings, ScriptedAnswer, answer_script, build_segmenter, compare_results
from tools.bench.common import request_batch, scene
from tools.bench.generation import bench_batched, bench_repeated_image, published_generate
from tools.bench.gpu_rows import GPU_ROW_KEYS, GPU_ROWS, Goal, floors, goal_met, gpu_rows, gpu_slug
from tools.bench.report import format_table
from tools.bench.training import (
    apply_published_training_recipe,
    bench_data_loading,
    bench_preprocessing,
    bench_training_step,
)
from transformers import LogitsProcessorList

#: The keys of the GPU tables of issues 11 and 12, in their order.
ISSUE_KEYS = (
    "gpu_decode_ms_per_token", "gpu_request_32_s", "gpu_request_128_vs_published", "gpu_followup_speedup",
    "gpu_sam_encode_ms", "gpu_prefill_ms", "gpu_batched_8_speedup", "gpu_train_step_b2_s",
    "gpu_train_samples_per_s_best", "gpu_train_peak_gb_b2", "gpu_train_peak_gb_b2_ckpt", "gpu_train_vs_published_step",
)

REQUIRED_KEYS = {"name", "ours", "baseline", "unit", "ratio", "goal"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As tools/benchmark.py runs on a CPU (2 threads on a busy 2-core machine oversubscribe it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke():
    return BenchSettings(smoke=True, hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def small_model():
    return build_segmenter(hidden_size=64, num_layers=2).eval()


def test_ratio_is_baseline_over_ours():
    assert BenchRow("t", ours=2.0, baseline=6.0, unit="s", goal="").ratio == pytest.approx(3.0)
    assert BenchRow("t", ours=4.0, baseline=1.0, unit="s", goal="").ratio == pytest.approx(0.25)
    assert BenchRow("t", ours=2.0, baseline=None, unit="s", goal="").ratio is None
    assert BenchRow("t", ours=None, baseline=1.0, unit="s", goal="").ratio is None
    assert BenchRow("t", ours=0.0, baseline=1.0, unit="s", goal="").ratio is None
    row = BenchRow("t", ours=2.0, baseline=5.0, unit="s", goal="g").to_dict()
    assert REQUIRED_KEYS <= set(row) and row["ratio"] == pytest.approx(2.5)


def test_command_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, "tools/benchmark.py", "--smoke", "--only", "generation,params", "--hidden_size", "64",
               "--num_layers", "2", "--out", str(out)]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(out.read_text())
    # Rewritten after each benchmark (a GPU run stopped by a time limit keeps its rows); the last
    # write is the whole report, and no half-written file is left.
    assert report["complete"] is True and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    rows = report["rows"]
    assert [row["name"] for row in rows] == [
        "one request, 4 new tokens",
        "one request, 8 new tokens",
        "trainable parameters, Qwen2.5-VL-7B + SAM ViT-H",
        "AdamW state (2 fp32 moments), Qwen2.5-VL-7B + SAM ViT-H",
    ]
    for row in rows:
        assert REQUIRED_KEYS <= set(row), row
        assert row["ratio"] == pytest.approx(row["baseline"] / row["ours"])
        assert row["check_passed"] is True, row["check"]
    params = rows[2]
    assert params["ours"] <= 40 and 1000 <= params["baseline"] <= 1200  # millions
    assert params["met"] is True
    # The printed table is the report's table.
    assert format_table(report) in process.stdout
    assert "command: python tools/benchmark.py --smoke" in process.stdout
    # Without CUDA every keyed GPU row is there, empty: never estimated.
    gpu = report["gpu_rows"]
    assert [row["key"] for row in gpu] == list(ISSUE_KEYS)
    for row in gpu:
        assert row["status"] == "not measured" and row["value"] is None, row
        assert row["met"] is None and row["floor"] is None and row["gpu"] is None
        assert row["goal"]["direction"] in ("<=", ">=") and row["goal"]["value"] > 0
        assert row["date"] == report["date"][:10]
    assert "| `gpu_decode_ms_per_token` |" in process.stdout


def test_gpu_rows_not_measured_without_values():
    assert GPU_ROW_KEYS == ISSUE_KEYS
    rows = gpu_rows(None, None, None, "2026-12-01")
    assert [row["key"] for row in rows] == list(ISSUE_KEYS)
    assert all(row["status"] == "not measured" and row["value"] is None and row["met"] is None for row in rows)
    assert rows[0]["goal"] == {"direction": "<=", "value": 5, "text": "<= 5 ms"}


def test_met_follows_value_and_goal_direction():
    at_most, at_least = Goal("<=", 5), Goal(">=", 3)
    assert goal_met(4.9, at_most) is True and goal_met(5, at_most) is True and goal_met(5.1, at_most) is False
    assert goal_met(3.2, at_least) is True and goal_met(3, at_least) is True and goal_met(2.9, at_least) is False
    assert goal_met(None, at_most) is None and goal_met(None, at_least) is None
    with pytest.raises(ValueError):
        goal_met(1.0, Goal("<", 2))
    # In a row: value, goal, met and the floor from the measured peaks.
    peaks = {"copy_bytes_per_s": 4e12, "bf16_matmul_flop_per_s": 8e14}
    measured = {
        "values": {"gpu_decode_ms_per_token": 20.0, "gpu_request_128_vs_published": 6.0},
        "details": {"gpu_decode_ms_per_token": {"check": "ok", "check_passed": True}},
        "counts": {"decode_weight_bytes": 16e9, "prefill_flops": 8e12, "sam_encode_flops": 3.2e12},
        "errors": {"gpu_prefill_ms": "RuntimeError: x"},
    }
    rows = {row["key"]: row for row in gpu_rows(measured, peaks, "NVIDIA H200", "2026-12-01")}
    decode = rows["gpu_decode_ms_per_token"]
    assert decode["value"] == 20.0 and decode["met"] is False and decode["status"] == "measured"
    assert decode["floor"] == pytest.approx(4.0) and decode["gpu"] == "NVIDIA H200" and decode["check_passed"]
    assert rows["gpu_request_128_vs_published"]["met"] is True
    assert rows["gpu_prefill_ms"]["status"].startswith("failed") and rows["gpu_prefill_ms"]["met"] is None
    assert rows["gpu_sam_encode_ms"]["status"] == "not measured"
    floor = floors(measured, peaks)
    assert floor["gpu_prefill_ms"][0] == pytest.approx(10.0) and floor["gpu_sam_encode_ms"][0] == pytest.approx(4.0)
    assert floor["gpu_request_32_s"][0] == pytest.approx(0.010 + 32 * 0.004 + 0.004)
    assert floors(measured, None) == {}
    assert gpu_slug("NVIDIA H200") == "h200" and gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert gpu_slug(None) == "cpu"
    assert {spec.issue for spec in GPU_ROWS} == {11, 12}


def test_published_generation_recomputes_everything_and_matches_ours(small_model):
    model = small_model
    image, _, _ = scene(0)
    batch = request_batch(model, [image], ["Where is the red circle?"])
    prompt_length = batch["input_ids"].shape[1]
    num_tokens = 10
    ids = answer_script(model.processor.tokenizer, num_tokens, model.seg_token_id, num_seg=2)
    assert len(ids) == num_tokens + 1 and ids[:num_tokens].count(model.seg_token_id) == 2

    def script():
        return LogitsProcessorList([ScriptedAnswer(ids, prompt_length)])

    lengths = []
    handle = model.capture_final_states.norm.register_forward_hook(lambda _m, _i, out: lengths.append(out.shape[1]))
    try:
        ours = model.generate(batch, num_tokens, logits_processor=script())
        ours_lengths, lengths[:] = list(lengths), []
        theirs = published_generate(model, batch, num_tokens, logits_processor=script())
    finally:
        handle.remove()
    # Ours: the prompt once, then one token per step (KV cache).
    assert ours_lengths == [prompt_length] + [1] * num_tokens
    # The published way: every step re-runs the whole sequence, then one more full forward.
    assert lengths == [prompt_length + step for step in range(num_tokens + 1)]
    assert ours[0].token_ids == theirs[0].token_ids == ids[:num_tokens]
    check = compare_results(ours, theirs, atol=1e-4)
    assert check["passed"], check["text"]
    assert check["num_seg_states"] == 2 and check["mask_agreement"] == 1.0


def test_compare_results_flags_differences(small_model):
    model = small_model
    image, _, _ = scene(1)
    batch = request_batch(model, [image], ["Segment the star."])
    ids = answer_script(model.processor.tokenizer, 6, model.seg_token_id, num_seg=1)
    [result] = model.generate(batch, 6, logits_processor=LogitsProcessorList([ScriptedAnswer(ids, batch["input_ids"].shape[1])]))
    assert compare_results([result], [result], atol=0)["passed"]
    import copy

    shifted = copy.deepcopy(result)
    shifted.seg_states = shifted.seg_states + 1e-2
    assert not compare_results([result], [shifted], atol=1e-4)["passed"]
    other_tokens = copy.deepcopy(result)
    other_tokens.token_ids = other_tokens.token_ids[:-1]
    assert not compare_results([result], [other_tokens], atol=1e-4)["passed"]


def test_repeated_image_and_batched_rows(smoke, small_model):
    [repeated] = bench_repeated_image(smoke, sam_variant="tiny")
    assert repeated.check_passed, repeated.check
    assert repeated.details["cache_stats"][-1]["sam_hits"] == 4
    assert repeated.details["cache_stats"][-1]["prefix_hits"] == 4
    assert set(repeated.details["first_request_s"]) == {"ours", "baseline"}
    rows = bench_batched(smoke, small_model)
    assert [row.name for row in rows] == ["8 requests, 4 new tokens each", "8 requests, 8 new tokens each"]
    for row in rows:
        assert row.check_passed, row.check
        assert row.ratio == pytest.approx(row.baseline / row.ours)


def test_published_training_recipe_trains_the_whole_matrices():
    model = build_segmenter(hidden_size=64, num_layers=2, vocab_rows=1024)
    apply_published_training_recipe(model, LoraSettings())
    vlm = model.vlm
    assert vlm.get_input_embeddings().weight.requires_grad and vlm.get_output_embeddings().weight.requires_grad
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("trainable_tokens" in n for n in names)
    assert any("lora_A" in n for n in names) and any("iou_prediction_head" in n for n in names)


def test_training_step_rows(smoke):
    time_row, memory_row = bench_training_step(smoke)
    for row in (time_row, memory_row):
        assert row.check_passed, row.check  # the same loss from the same weights and batch
    trainable = time_row.details["trainable_params"]
    # Whole embed_tokens and lm_head (2048 rows x 64 each) against two [SEG] rows.
    assert trainable["baseline"] - trainable["ours"] >= 2 * 2048 * 64 - 2 * 64 - 10_000
    memory = memory_row.details["bytes"]
    for side in ("ours", "baseline"):
        # params + grads + two AdamW moments, fp32 (plus AdamW's step counters). LISA's recipe also
        # marks the IoU head trainable, which gets no gradient (and so no AdamW state).
        assert memory[side]["param_bytes"] == 4 * memory[side]["trainable_params"]
        assert memory[side]["grad_bytes"] <= memory[side]["param_bytes"]
        assert memory[side]["optimizer_state_bytes"] >= 2 * memory[side]["grad_bytes"]
    assert memory["ours"]["grad_bytes"] == memory["ours"]["param_bytes"]
    assert memory_row.ours == pytest.approx(memory["ours"]["total_bytes"] / 1e6)
    assert memory_row.baseline > memory_row.ours


def test_data_loading_row_uses_sam_1024_and_qwen_default_pixels(smoke, tmp_path):
    [row] = bench_data_loading(smoke, tmp_path)
    assert row.check_passed, row.check
    assert row.baseline is None and row.ratio is None and row.ours > 0
    assert "(391 image tokens)" in row.check  # 640x480 at Qwen2.5-VL's default limits: 34 x 46 patches
    assert row.details["sam_image_size"] == 1024
    assert len(list((tmp_path / "jpeg_640x480" / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg"))) == 4


def test_preprocessing_rows_check_that_both_ways_give_the_same_inputs(smoke):
    rows = bench_preprocessing(smoke)
    assert [row.details.get("conversations") for row in rows] == [1, 3, 1, None, None]
    assert rows[3].details["threads"] == min(8, os.cpu_count() or 1)  # the 8-request batch, on threads
    assert rows[4].details["image_grid_thw"] == [[1, 60, 82]]  # the phone photo's tokens, both ways
    for row in rows:
        assert row.check_passed, row.check
        assert row.ours > 0 and row.baseline > 0 and row.unit == "ms"


def test_decode_floor_counts_the_weights_one_token_reads():
    """Qwen2.5-VL-7B (built on the meta device): 16.6 GB of bf16 weights, of which a decoded token
    reads the language model and the LM head (14.1 GB), not the vision tower or the embedding."""
    from tools.bench.param_count import VLM_SPECS
    from model.vlm import VLM_FAMILIES
    from tools.bench.gpu_rows import decode_weight_bytes

    spec = VLM_SPECS["qwen2.5-vl-7b"]
    model_class = VLM_FAMILIES[spec.family].model_class
    config = model_class.config_class(text_config=dict(spec.text), vision_config=dict(spec.vision),
                                      tie_word_embeddings=spec.tie_word_embeddings)
    with torch.device("meta"):
        vlm = model_class._from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in vlm.parameters())
    embedding = vlm.get_input_embeddings().weight
    vision = sum(p.numel() * p.element_size() for n, p in vlm.named_parameters() if "visual" in n.split("."))
    assert 16.5e9 < total < 16.7e9
    assert decode_weight_bytes(vlm) == total - vision - embedding.numel() * embedding.element_size()
    assert 14.0e9 < decode_weight_bytes(vlm) < 14.3e9


def test_real_size_code_path_on_a_tiny_config(smoke):
    """The real-size measurements (GPU rows) run end to end on a tiny configuration on the CPU."""
    from tools.bench.param_count import tiny_spec
    from tools.bench.real_size import measure_inference, measure_training

    updates = []
    inference = measure_inference(smoke, spec=tiny_spec(), sam_variant="tiny", say=lambda _m: None,
                                  on_update=lambda part: updates.append({k: dict(v) for k, v in part.items()}))
    assert inference["errors"] == {}
    # What is measured reaches the report at once, one measurement after another.
    assert len(updates) == 5 and updates[-1] == inference
    assert [len(u["values"]) for u in updates] == [3, 4, 5, 6, 7]
    assert set(inference["values"]) == {row.key for row in GPU_ROWS if row.issue == 11}
    for key, value in inference["values"].items():
        # (the decode time is a difference of two timings: on a tiny model it can be below 0)
        assert isinstance(value, float) and math.isfinite(value), key
        details = inference["details"][key]
        assert details.get("check_passed", True), (key, details.get("check"))
    assert {"sam_encode_flops", "prefill_flops", "decode_weight_bytes"} <= set(inference["counts"])
    # Follow-ups: one session, warmed up first (a new session's first request would record its
    # thread's CUDA graphs, which no user's first question pays).
    follow_up = inference["details"]["gpu_followup_speedup"]
    assert follow_up["warm_up_s"] > 0 and len(follow_up["first_s"]) == follow_up["rounds"]
    assert len(follow_up["later_s"]) == 4 * follow_up["rounds"]
    # --compile_sam measured beside the default encoder: compiled (no fallback), the same embeddings.
    compiled = inference["details"]["gpu_sam_encode_ms"]["compile_sam"]
    assert compiled["compiled"] and compiled["ms"] > 0 and compiled["max_abs_difference"] <= 1e-4 * compiled["max_abs_eager"]
    training = measure_training(smoke, spec=tiny_spec(), sam_variant="tiny", say=lambda _m: None, batch_sizes=(2, 4))
    assert training["errors"] == {}
    # Peak memory is measured on CUDA only; the rest runs here.
    assert set(training["values"]) == {"gpu_train_step_b2_s", "gpu_train_samples_per_s_best", "gpu_train_vs_published_step"}
    assert training["details"]["gpu_train_vs_published_step"]["check_passed"]
    assert set(training["details"]["gpu_train_samples_per_s_best"]["samples_per_s_by_batch"]) == {2, 4}


def test_ddp_row_runs_train_ddp_under_torchrun(smoke, tmp_path):
    from tools.bench import common
    from tools.bench.training import bench_ddp
    from utils import trainer

    assert common.METRICS_FILE == trainer.METRICS_FILE

    [row] = bench_ddp(smoke, tmp_path)
    rates = row.details["samples_per_second"]
    assert rates["1"] > 0 and rates["2"] > 0
    assert row.ours == pytest.approx(1000 / rates["2"]) and row.baseline == pytest.approx(1000 / rates["1"])
    assert row.ratio == pytest.approx(rates["2"] / rates["1"])
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    assert len(logs) == 2 and any("ddp_n2" in name for name in logs)


def test_report_so_far_after_each_benchmark(smoke):
    from tools.bench.report import run_benchmarks

    parts = []
    report = run_benchmarks(smoke, ["generation", "params"], on_part=parts.append)
    [partial] = parts  # after generation; the last benchmark's report is the returned one
    assert partial["complete"] is False and report["complete"] is True
    assert {row["details"]["benchmark"] for row in partial["rows"]} == {"generation"}
    assert partial["rows"] == report["rows"][:len(partial["rows"])] and len(report["rows"]) > len(partial["rows"])
    assert list(partial["seconds_by_benchmark"]) == ["generation"]


def test_report_names_keep_the_two_real_size_halves_apart():
    from tools.bench.report import default_report_name

    def name(benchmarks):
        return default_report_name({"date": "2026-12-01T10:00:00+00:00", "gpu": {"name": "NVIDIA H200"},
                                    "benchmarks": benchmarks})

    assert name(["real_size_inference", "real_size_training"]) == "2026-12-01-h200.json"
    assert name(["real_size_inference"]) == "2026-12-01-h200-real_size_inference.json"
    assert name(["real_size_training"]) == "2026-12-01-h200-real_size_training.json"
    assert name(["generation", "params"]) == "2026-12-01-h200.json"


def test_prefill_floor_counts_grouped_query_attention_as_repeated_heads(monkeypatch):
    """An unmasked Qwen2.5-VL-7B prompt calls SDPA with 28 query and 4 key/value heads; the FLOP
    counter (torch 2.11's refused the shapes, leaving the prefill row without a floor) counts it as
    the same attention with the key and value heads repeated, with our formula whatever torch's
    own does (torch 2.13's counts these shapes too). Meta tensors: CUDA's op, no GPU."""
    from tools.bench import gpu_rows
    from tools.bench.gpu_rows import count_flops

    shapes = []
    formula = gpu_rows.grouped_query_sdpa_flops
    monkeypatch.setattr(gpu_rows, "grouped_query_sdpa_flops",
                        lambda q, k, v, *a, **kw: shapes.append((tuple(q), tuple(k))) or formula(q, k, v, *a, **kw))

    def attention(kv_heads: int):
        query = torch.empty(1, 28, 426, 128, device="meta", dtype=torch.bfloat16)
        kv = torch.empty(1, kv_heads, 426, 128, device="meta", dtype=torch.bfloat16)
        return count_flops(lambda: torch.ops.aten._scaled_dot_product_efficient_attention(query, kv, kv, None, False))[0]

    assert attention(4) == attention(28) == 2 * 2 * 28 * 426 * 426 * 128
    assert shapes == [((1, 28, 426, 128), (1, 4, 426, 128)), ((1, 28, 426, 128), (1, 28, 426, 128))]


def test_report_names_the_models_its_figures_come_from():
    """A GPU run of the real-size rows alone said "tiny Qwen2.5-VL" (2026-11-30): the report names
    the real-size models where they ran, the tiny one where the side-by-side rows ran."""
    from tools.bench.report import model_description

    real = BenchSettings(device="cuda", real_size="real")
    assert model_description(real, ["real_size_inference"]) == "keyed GPU rows: Qwen2.5-VL-7B + SAM ViT-H, random weights, bf16"
    both = model_description(real, ["generation", "real_size_training"])
    assert both.startswith("tiny Qwen2.5-VL") and "Qwen2.5-VL-7B + SAM ViT-H" in both
    assert model_description(BenchSettings(), ["generation"]).startswith("tiny Qwen2.5-VL")


def test_gpu_profile_reports_where_the_time_goes(tmp_path):
    """tools/gpu_profile.py on a tiny config on the CPU: every call profiled (after warm-up), with
    its wall time, host operators and the per-token difference of the two request lengths."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_profile
    finally:
        sys.path.remove(str(REPO / "tools"))
    out = tmp_path / "profile.json"
    assert gpu_profile.main(["--tiny", "--device", "cpu", "--only", "inference", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["calls"]) == {"request_32", "request_128", "per_decoded_token", "prefill", "sam_encode"}
    request_32, request_128 = report["calls"]["request_32"], report["calls"]["request_128"]
    assert request_128["wall_ms"] > request_32["wall_ms"] > 0
    assert any(row["name"] == "aten::mm" or row["name"] == "aten::addmm" for row in request_32["top_host"])
    assert report["calls"]["per_decoded_token"]["wall_ms"] == pytest.approx(
        (request_128["wall_ms"] - request_32["wall_ms"]) / 96)
    assert request_32["gpu_kernel_ms"] == 0 and request_32["launch_total"] == 0  # no CUDA here
