"""Bounded image tokens: --min_pixels / --max_pixels on every entry point, a default cap of 1,280
tokens per image whatever the checkpoint's processor allows, and the count shown to users.

The "huge" model below is a tiny segmenter whose saved processor carries Qwen2.5-VL's shipped
limits (``preprocessor_config.json`` with min_pixels 3,136 and max_pixels 12,845,056).
"""

import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from model.image_tokens import (
    DEFAULT_MAX_IMAGE_TOKENS,
    apply_pixel_limits,
    image_token_counts,
    pixel_limits,
)
from test_inference import run_entry

QWEN25_SHIPPED = {"min_pixels": 3136, "max_pixels": 12845056}
CAP_28 = DEFAULT_MAX_IMAGE_TOKENS * 28 * 28  # 1,003,520


def shipped_style_processor(directory, limits=QWEN25_SHIPPED):
    """Make ``directory``'s saved image processor look like Qwen2.5-VL's download."""
    processor_config = directory / "processor_config.json"
    config = json.loads(processor_config.read_text())
    image = config.pop("image_processor")
    processor_config.write_text(json.dumps(config))
    image.pop("size", None)
    image.update(limits)
    (directory / "preprocessor_config.json").write_text(json.dumps(image))


def saved_limits(directory) -> tuple[int, int]:
    """(min, max) pixels that a saved processor directory carries, from its JSON files."""
    config = json.loads((directory / "processor_config.json").read_text()).get("image_processor")
    if config is None:
        config = json.loads((directory / "preprocessor_config.json").read_text())
    size = config.get("size") or {}
    return size.get("shortest_edge", config.get("min_pixels")), size.get("longest_edge", config.get("max_pixels"))


@pytest.fixture(scope="module")
def huge_dir(tmp_path_factory):
    from model.tiny import make_tiny_segmenter

    directory = make_tiny_segmenter(tmp_path_factory.mktemp("huge_limits"), "qwen2_5_vl")
    shipped_style_processor(directory / "vlm")
    return directory


def photo(width: int, height: int) -> np.ndarray:
    """A smooth synthetic photo (compresses well as a file)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


# ------------------------------------------------------------------------------- the numbers


def qwen_image_processor(patch: int, **limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, **limits)


def tokens_of(image_processor, width, height) -> int:
    grid = image_processor(images=[photo(width, height)], return_tensors="pt")["image_grid_thw"]
    [count] = image_token_counts(grid, image_processor.merge_size)
    return count


def test_real_processor_numbers_uncapped_and_capped():
    """The README's numbers, from the real processor (smart_resize), Qwen2.5-VL's shipped limits."""
    processor = qwen_image_processor(14, **QWEN25_SHIPPED)
    uncapped = {size: tokens_of(processor, *size) for size in [(640, 480), (1920, 1080), (4000, 3000)]}
    assert uncapped == {(640, 480): 391, (1920, 1080): 2691, (4000, 3000): 15301}
    limits = apply_pixel_limits(processor)
    assert (limits.min_pixels, limits.max_pixels, limits.max_tokens) == (3136, CAP_28, 1280)
    capped = {size: tokens_of(processor, *size) for size in [(640, 480), (1920, 1080), (4000, 3000)]}
    assert capped == {(640, 480): 391, (1920, 1080): 1222, (4000, 3000): 1230}
    # The processor saves what it uses.
    assert processor.to_dict()["size"] == {"shortest_edge": 3136, "longest_edge": CAP_28}


def test_the_cap_is_1280_tokens_for_patch_16_too():
    """Qwen3-VL's patch 16: one token per 32x32 pixels, so the cap is 1,310,720 pixels."""
    processor = qwen_image_processor(16, min_pixels=65536, max_pixels=16777216)
    limits = apply_pixel_limits(processor)
    assert limits.max_pixels == 1280 * 32 * 32 and limits.max_tokens == 1280
    assert tokens_of(processor, 4000, 3000) == 1230


def test_a_model_within_the_cap_keeps_its_own_limits(tiny_segmenter_dir):
    from model.loading import load_segmenter

    model = load_segmenter(tiny_segmenter_dir("qwen2_5_vl"), device="cpu")
    assert (pixel_limits(model.processor).min_pixels, pixel_limits(model.processor).max_pixels) == (3136, 28224)


# ------------------------------------------------------------------------------- training


def train_args(version, tmp_path, *extra):
    from utils.train_args import parse_args

    tmp_path.mkdir(parents=True, exist_ok=True)
    return parse_args(["--version", str(version), "--dataset_dir", str(tmp_path), "--log_base_dir", str(tmp_path),
                       "--exp_name", "run", "--no_eval", "--workers", "0", "--batch_size", "1",
                       "--grad_accumulation_steps", "1", *extra])


def make_trainer(args):
    from utils.distributed import DistInfo
    from utils.trainer import Trainer

    return Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), None, None)


def test_training_applies_the_cap_saves_it_and_logs_image_tokens(huge_dir, tmp_path):
    from model.merge import merge_checkpoint

    trainer = make_trainer(train_args(huge_dir, tmp_path / "a"))
    assert trainer.pixel_limits.max_pixels == CAP_28
    model = trainer.model
    image = photo(1920, 1080)
    sample = model.prepare(image, [("Where is the thing?", "It is [SEG].")], [np.ones((1080, 1920), np.uint8)])
    record = trainer._optimizer_step([model.collate([sample])])
    assert record["image_tokens_max"] == 1222 and record["image_tokens_mean"] == 1222  # 2,691 uncapped
    checkpoint = trainer.save_checkpoint()
    trainer.close()
    assert saved_limits(checkpoint / "adapter") == (3136, CAP_28)
    merged = merge_checkpoint(checkpoint, tmp_path / "merged", dtype=torch.float32)
    assert saved_limits(merged / "vlm") == (3136, CAP_28)


def test_training_flags_win_and_a_resume_keeps_the_runs_values(huge_dir, tmp_path):
    # A flag above the default cap is used as given.
    trainer = make_trainer(train_args(huge_dir, tmp_path, "--min_pixels", "10000", "--max_pixels", "2000000"))
    assert (trainer.pixel_limits.min_pixels, trainer.pixel_limits.max_pixels) == (10000, 2000000)
    checkpoint = trainer.save_checkpoint()
    trainer.close()
    assert saved_limits(checkpoint / "adapter") == (10000, 2000000)
    # Resumed without the flags: the run's values, not capped again.
    resumed = make_trainer(train_args(huge_dir, tmp_path, "--resume", str(checkpoint)))
    assert (resumed.pixel_limits.min_pixels, resumed.pixel_limits.max_pixels) == (10000, 2000000)
    resumed.close()


# ------------------------------------------------------------------------------- inference and evaluation


def test_inference_caps_by_default_and_a_flag_wins(huge_dir, caplog):
    from model.loading import load_segmenter
    from utils.inference import InferenceSession, describe

    with caplog.at_level("INFO"):
        model = load_segmenter(huge_dir, device="cpu")
    assert pixel_limits(model.processor).max_pixels == CAP_28
    assert "max_pixels 12,845,056" in caplog.text and "capped at 1,003,520" in caplog.text
    session = InferenceSession(model, max_new_tokens=2)
    answer = session.ask(photo(4000, 3000), "Where is the thing?")
    session.close()
    assert answer.image_tokens == 1230 <= DEFAULT_MAX_IMAGE_TOKENS  # 15,301 uncapped
    assert answer.record()["image_tokens"] == 1230
    assert "image: 4000x3000, 1,230 image tokens" in describe(answer)
    flagged = load_segmenter(huge_dir, device="cpu", max_pixels=2_000_000, min_pixels=5000)
    assert (pixel_limits(flagged.processor).min_pixels, pixel_limits(flagged.processor).max_pixels) == (5000, 2_000_000)


def test_evaluation_uses_the_same_limits(huge_dir, tmp_path):
    from utils.eval_cli import load_model, parse_args

    args = parse_args(["--version", str(huge_dir), "--dataset_dir", str(tmp_path)])
    model, _, info = load_model(args, torch.device("cpu"))
    assert pixel_limits(model.processor).max_pixels == CAP_28
    assert (info["max_pixels"], info["max_image_tokens"]) == (CAP_28, 1280)
    args = parse_args(["--version", str(huge_dir), "--dataset_dir", str(tmp_path), "--max_pixels", "200704"])
    model, _, info = load_model(args, torch.device("cpu"))
    assert pixel_limits(model.processor).max_pixels == 200704 and info["max_image_tokens"] == 256


def test_inference_entry_point_prints_and_writes_the_image_tokens(huge_dir, tmp_path):
    Image.fromarray(photo(4000, 3000)).save(tmp_path / "big.jpg", quality=90)
    result = run_entry(["inference.py", "--version", huge_dir, "--image", tmp_path / "big.jpg", "--prompt", "Where?",
                        "--max_new_tokens", "2", "--vis_save_path", tmp_path / "vis"])
    assert result.returncode == 0, result.stderr
    # Decoded at half scale (what the model takes: 1,003,520 pixels), with the whole photo's tokens.
    assert "image: 4000x3000 (seen downscaled to 2000x1500), 1,230 image tokens" in result.stdout
    assert "capped at 1,003,520" in result.stderr
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "big.jpg", "prompt": "Where?"}) + "\n")
    result = run_entry(["inference.py", "--version", huge_dir, "--input_jsonl", tmp_path / "in.jsonl",
                        "--output_jsonl", tmp_path / "out.jsonl", "--max_new_tokens", "2", "--max_pixels", "200704"])
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert record["error"] is None and record["image_tokens"] == 234  # 364x504 pixels


# ------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_pixels", "0"], "--max_pixels must be a positive whole number of pixels, got 0"),
        (["--min_pixels", "-5"], "--min_pixels must be a positive whole number of pixels, got -5"),
        (["--min_pixels", "5000", "--max_pixels", "4000"], "--min_pixels 5,000 is above --max_pixels 4,000"),
    ],
)
def test_bad_values_are_named_at_parse_time(flags, message, capsys, tmp_path):
    from utils import eval_cli, train_args

    with pytest.raises(SystemExit):
        train_args.parse_args(["--version", str(REPO), "--vision_pretrained", __file__, "--dataset_dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--version", str(REPO), "--dataset_dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_below_one_token_is_named_when_the_model_loads(huge_dir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["inference.py", "--version", str(huge_dir), "--max_pixels", "700",
                                      "--image", "x.jpg", "--prompt", "Where?"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "inference.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith("error: --max_pixels 700 is below one image token (28x28 = 784 pixels")
    with pytest.raises(ValueError, match="--min_pixels 2,000,000 is above the max_pixels in use"):
        apply_pixel_limits(qwen_image_processor(14, **QWEN25_SHIPPED), min_pixels=2_000_000)
