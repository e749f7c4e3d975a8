"""The data-layer contract: RawSample, templates, per-item random generators, public names."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

import utils.data as data
from utils.data import SEG_TOKEN, CorruptSampleError, RawSample, templates
from utils.data.rng import derive_rng, sample_without_replacement


def make_sample(answers: list[str], masks: int) -> RawSample:
    return RawSample(
        image=np.zeros((4, 5, 3), np.uint8), image_path="/x.jpg", dataset="t",
        turns=[(f"q{i}", answer) for i, answer in enumerate(answers)],
        masks=[np.zeros((4, 5), np.uint8) for _ in range(masks)],
        requests=[f"r{i}" for i in range(len(answers))],
        meta={"no_target": [False] * len(answers)},
    )


def test_contract_names_exist() -> None:
    assert SEG_TOKEN == "[SEG]"
    assert issubclass(CorruptSampleError, Exception)
    for name in ("RawSample", "load_image_rgb", "HybridDataset", "ShardedEvalSampler", "build_train_dataset",
                 "build_val_dataset", "ReasonSegDataset", "ReferSegDataset", "GRefCocoDataset", "Ade20kDataset",
                 "CocoStuffDataset", "PacoLvisDataset", "PascalPartDataset", "MapillaryDataset", "LlavaVqaDataset",
                 "CocoInstancesDataset"):
        assert hasattr(data, name), name


def test_raw_sample_masks_per_turn_and_validation() -> None:
    sample = make_sample(["[SEG] and [SEG].", "No.", "Sure, [SEG]."], masks=3)
    sample.validate()
    assert sample.num_seg_tokens == 3
    assert [len(group) for group in sample.masks_per_turn()] == [2, 0, 1]
    with pytest.raises(CorruptSampleError, match="2 \\[SEG\\] tokens but 3 masks"):
        make_sample(["[SEG] and [SEG]."], masks=3).validate()
    bad = make_sample(["[SEG]."], masks=1)
    bad.masks[0] = np.zeros((3, 5), np.uint8)
    with pytest.raises(CorruptSampleError, match="/x.jpg"):
        bad.validate()


def test_answer_templates_carry_one_seg_per_mask() -> None:
    assert templates.join_seg_tokens(1) == "[SEG]"
    assert templates.join_seg_tokens(2) == "[SEG] and [SEG]"
    assert templates.join_seg_tokens(3) == "[SEG], [SEG] and [SEG]"
    rng = derive_rng(0)
    for count in (1, 2, 4):
        for _ in range(20):
            assert templates.segmentation_answer(count, rng).count(SEG_TOKEN) == count
    assert templates.segmentation_answer(1) == "[SEG]."
    for _ in range(20):
        assert SEG_TOKEN not in templates.no_target_answer(rng)
    assert templates.explanatory_answer("Because.", None) == "[SEG]. Because."


def test_question_templates() -> None:
    assert templates.segmentation_question("The Red Circle", False) == (
        "What is the red circle in this image? Please output segmentation mask.")
    rng = derive_rng(1)
    for _ in range(30):
        question = templates.segmentation_question("the red circle", False, rng)
        assert "the the" not in question and "red circle" in question
        assert templates.segmentation_question("Where is it?", True, rng).startswith("Where is it? Please")
    assert templates.text_question("Where is it?", True) == "Where is it?"
    assert templates.strip_image_placeholder("<image>\nWhat is this?") == "What is this?"


def test_derived_generators_are_pure_functions_of_their_keys() -> None:
    assert derive_rng(1, 2, "a").integers(1 << 30) == derive_rng(1, 2, "a").integers(1 << 30)
    assert derive_rng(1, 2, "a").integers(1 << 30) != derive_rng(1, 2, "b").integers(1 << 30)
    assert derive_rng(1, 2).integers(1 << 30) != derive_rng(2, 1).integers(1 << 30)
    picked = sample_without_replacement(derive_rng(3), 3, 10)
    assert len(set(picked)) == 3 and sample_without_replacement(derive_rng(3), 5, 2) in ([0, 1], [1, 0])
