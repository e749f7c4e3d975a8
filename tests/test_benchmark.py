"""tools/benchmark.py and utils/performance.py: the report's structure, the ratios, and that both
sides of every comparison compute the same thing. No timing thresholds here."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from model.param_count import tiny_spec
from model.vlm import LoraSettings
from utils.performance import (
    BenchRow,
    BenchSettings,
    ScriptedAnswer,
    answer_script,
    apply_published_training_recipe,
    bench_batched,
    bench_data_loading,
    bench_real_size,
    bench_repeated_image,
    bench_training_step,
    build_segmenter,
    compare_results,
    format_table,
    published_generate,
    request_batch,
    scene,
)
from transformers import LogitsProcessorList

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
    handle = model.hidden_states.norm.register_forward_hook(lambda _m, _i, out: lengths.append(out.shape[1]))
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
    assert repeated.details["cache_stats"][-1]["vision_hits"] == 4
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


def test_real_size_code_path_on_a_tiny_config(smoke):
    rows = bench_real_size(smoke, sam_variant="tiny", spec_override=tiny_spec())
    assert len(rows) == 4
    for row in rows:
        assert row.check_passed, (row.name, row.check)
        assert "not real size" in row.name
    train_time, train_memory, request_time, request_memory = rows
    assert train_time.ours > 0 and request_time.ours > 0
    assert train_memory.ours is None and request_memory.ours is None  # peak memory is measured on CUDA only


def test_ddp_row_runs_train_ddp_under_torchrun(smoke, tmp_path):
    from utils import performance, trainer
    from utils.performance import bench_ddp

    assert performance.METRICS_FILE == trainer.METRICS_FILE

    [row] = bench_ddp(smoke, tmp_path)
    rates = row.details["samples_per_second"]
    assert rates["1"] > 0 and rates["2"] > 0
    assert row.ours == pytest.approx(1000 / rates["2"]) and row.baseline == pytest.approx(1000 / rates["1"])
    assert row.ratio == pytest.approx(rates["2"] / rates["1"])
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    assert len(logs) == 2 and any("ddp_n2" in name for name in logs)
