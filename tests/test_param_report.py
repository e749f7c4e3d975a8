"""Tests for tools/bench/param_count.py and tools/param_report.py (real-size models on the meta device)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.bench.param_count import (  # noqa: E402
    VLM_SPECS,
    analytic_lora_params,
    count_parameters,
    markdown_table,
    resolve_model_name,
)
from model.vlm import LoraSettings  # noqa: E402

TOOL = REPO_ROOT / "tools" / "param_report.py"
REQUIRED_KEYS = {"total_params", "trainable_params", "trainable_by_part", "adamw_state_bytes"}


@pytest.fixture(scope="module")
def ours_7b():
    return count_parameters("qwen2.5-vl-7b", "vit_h", "ours")


@pytest.fixture(scope="module")
def lisa_7b():
    return count_parameters("qwen2.5-vl-7b", "vit_h", "lisa")


def test_ours_recipe_is_small(ours_7b):
    assert ours_7b["trainable_params"] <= 40e6
    parts = ours_7b["trainable_by_part"]
    assert set(parts) == {"lora", "seg_token_rows", "projection", "mask_decoder"}
    assert sum(parts.values()) == ours_7b["trainable_params"]
    # One [SEG] row of H values in embed_tokens and one in the (untied) lm_head, via peft on meta.
    assert parts["seg_token_rows"] == 2 * 3584
    assert ours_7b["seg_token_rows_method"].startswith("peft")
    # Projection Linear(H, H) + Linear(H, 256), with biases.
    assert parts["projection"] == 3584 * 3584 + 3584 + 3584 * 256 + 256
    # The mask decoder trains without its IoU head.
    assert parts["mask_decoder"] < ours_7b["total_detail"]["sam_mask_decoder"]
    assert ours_7b["adamw_state_bytes"] == 8 * ours_7b["trainable_params"]


def test_lisa_recipe_trains_whole_matrices(lisa_7b, ours_7b):
    assert lisa_7b["trainable_params"] > 1.0e9
    parts = lisa_7b["trainable_by_part"]
    assert parts["embed_tokens"] == parts["lm_head"] == 152064 * 3584
    assert "seg_token_rows" not in parts
    assert parts["mask_decoder"] == lisa_7b["total_detail"]["sam_mask_decoder"]  # IoU head included
    assert parts["lora"] == ours_7b["trainable_by_part"]["lora"]
    assert lisa_7b["adamw_state_bytes"] == 8 * lisa_7b["trainable_params"]


def test_totals_match_published_sizes(ours_7b):
    vlm = ours_7b["total_by_part"]["vlm"]
    assert abs(vlm - 8.3e9) / 8.3e9 < 0.03
    sam = ours_7b["total_by_part"]["sam"]
    assert abs(sam - 636e6) / 636e6 < 0.02
    assert ours_7b["total_params"] == sum(ours_7b["total_by_part"].values())


def test_lora_count_matches_formula(ours_7b):
    r = 8
    expected = 28 * r * ((3584 + 3584) + (3584 + 4 * 128))  # q: 3584 -> 3584, v: 3584 -> 512
    assert ours_7b["trainable_by_part"]["lora"] == expected
    assert analytic_lora_params(VLM_SPECS["qwen2.5-vl-7b"], LoraSettings(r=r)) == expected


def test_other_lora_settings_and_tied_model():
    settings = LoraSettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    report = count_parameters("qwen2.5-vl-3b", "vit_b", "ours", settings)
    # peft's count equals the analytic one; LoRA stays off the vision tower.
    assert report["trainable_by_part"]["lora"] == analytic_lora_params(VLM_SPECS["qwen2.5-vl-3b"], settings)
    assert report["trainable_by_part"]["seg_token_rows"] == 2048  # tied: one matrix, one row
    lisa = count_parameters("qwen2.5-vl-3b", "vit_b", "lisa")
    assert lisa["trainable_by_part"]["embed_tokens"] == 151936 * 2048
    assert "lm_head" not in lisa["trainable_by_part"]  # tied: counted once


def test_train_language_model():
    report = count_parameters("qwen2-vl-2b", "vit_b", train_language_model=True)
    parts = report["trainable_by_part"]
    assert "lora" not in parts and report["lora"] is None
    assert "vision_tower" not in parts
    assert parts["language_model"] > 1e9


def test_model_names():
    assert resolve_model_name("Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2.5-vl-7b"
    with pytest.raises(ValueError, match="qwen3-vl-8b"):
        resolve_model_name("llava-7b")


def test_markdown_table():
    table = markdown_table("vit_h")
    lines = [line for line in table.splitlines() if line.startswith("| qwen")]
    assert [line.split("|")[1].strip() for line in lines] == list(VLM_SPECS)


def _run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def test_tool_prints_json():
    result = _run("--model", "qwen2.5-vl-7b", "--sam", "vit_h", "--lora_r", "8", "--lora_alpha", "16",
                  "--lora_target_modules", "q_proj,v_proj", "--recipe", "lisa")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert REQUIRED_KEYS <= set(report)
    assert report["recipe"] == "lisa" and report["trainable_params"] > 1.0e9


def test_tool_unknown_model():
    result = _run("--model", "qwen9-vl-1b")
    assert result.returncode != 0
    assert "unknown model" in result.stderr
    for name in VLM_SPECS:
        assert name in result.stderr
