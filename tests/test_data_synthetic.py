"""The synthetic generator: determinism, held-out val scenes, and masks that match the pixels."""

from __future__ import annotations

import hashlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest

from utils.data import (
    Ade20kDataset,
    build_source_dataset,
    build_val_dataset,
    write_synthetic_dataset,
)
from utils.data.rng import derive_rng
from utils.data.synthetic import COLOURS, make_scene, reasoning_queries, referring_expressions, render_scene

NUM_TRAIN, NUM_VAL = 12, 5


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(str(root), seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL)
    return root


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_gives_identical_bytes(synthetic_root: Path, tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path / "again"), seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL)
    first, second = file_digests(synthetic_root), file_digests(tmp_path / "again")
    assert first == second
    for name in ("refer_seg/refcoco/refs(unc).p", "refer_seg/grefcoco/grefs(unc).json",
                 "llava_dataset/synthetic_vqa.json", "reason_seg/ReasonSeg/explanatory/train.json"):
        assert name in first
    write_synthetic_dataset(str(tmp_path / "other"), seed=4, num_train=NUM_TRAIN, num_val=NUM_VAL)
    other = file_digests(tmp_path / "other")
    assert other["refer_seg/refcoco/refs(unc).p"] != first["refer_seg/refcoco/refs(unc).p"]


def test_existing_output_is_protected(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(str(synthetic_root), seed=3, num_train=2, num_val=1)
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic_dataset(str(tmp_path), seed=3, num_train=2, num_val=1, overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_overwrite_removes_stale_files(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path), seed=0, num_train=6, num_val=2)
    write_synthetic_dataset(str(tmp_path), seed=0, num_train=3, num_val=2, overwrite=True)
    assert len(list((tmp_path / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg"))) == 3


def colour_region(image: np.ndarray, colour: str) -> np.ndarray:
    distance = np.abs(image.astype(int) - np.array(COLOURS[colour])).sum(axis=2)
    return distance < 60


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def shape_colour(sample_text: str) -> str | None:
    return next((colour for colour in COLOURS if colour in sample_text), None)


def test_reason_seg_and_refer_masks_match_the_drawn_shapes(synthetic_root: Path) -> None:
    for name in ("synthetic|val", "synthetic|refer_val"):
        dataset = build_val_dataset(name, str(synthetic_root))
        assert len(dataset) >= NUM_VAL
        for index in range(len(dataset)):
            sample = dataset[index]
            sample.validate()
            mask = sample.masks[0] == 1
            # the target's colour is the most common colour inside its mask
            inside = sample.image[mask].astype(int)
            colour = min(COLOURS, key=lambda c: np.abs(inside - np.array(COLOURS[c])).sum(axis=1).mean())
            assert iou(mask, colour_region(sample.image, colour)) > 0.85, (name, index, sample.requests)


def test_grefcoco_has_multi_and_no_target_expressions(synthetic_root: Path) -> None:
    dataset = build_val_dataset("synthetic|grefer_val", str(synthetic_root))
    samples = [dataset[i] for i in range(len(dataset))]
    assert any(s.meta["no_target"] == [True] and s.masks == [] for s in samples)
    assert any(s.requests[0].startswith("all the") for s in samples)
    assert all(s.dataset == "synthetic_grefer" for s in samples)


def test_sem_seg_masks_and_class_names(synthetic_root: Path) -> None:
    dataset = Ade20kDataset(str(synthetic_root), mode="val")
    assert len(dataset) == NUM_TRAIN
    for index in range(len(dataset)):
        sample = dataset[index]
        assert "background" in sample.requests
        for request, mask in zip(sample.requests, sample.masks):
            if request != "background":
                assert iou(mask == 1, colour_region(sample.image, request.split()[0])) > 0.85
    assert len(Ade20kDataset(str(synthetic_root), split="validation", mode="val")) == NUM_VAL


def test_val_scenes_are_held_out(synthetic_root: Path) -> None:
    train = build_source_dataset("reason_seg", "ReasonSeg|train", str(synthetic_root), mode="val")
    val = build_val_dataset("synthetic|val", str(synthetic_root))
    train_images = {hashlib.sha256(train[i].image.tobytes()).hexdigest() for i in range(len(train))}
    val_images = {hashlib.sha256(val[i].image.tobytes()).hexdigest() for i in range(len(val))}
    assert not train_images & val_images
    refer_train = build_source_dataset("refer_seg", "refcoco", str(synthetic_root), mode="train")
    refer_val = build_val_dataset("synthetic|refer_val", str(synthetic_root))
    assert not set(refer_train.image_ids) & {refer_val.targets[p].image_id for p, _ in refer_val.val_items}


def test_train_sources_read_the_root(synthetic_root: Path) -> None:
    vqa = build_source_dataset("vqa", "synthetic_vqa", str(synthetic_root))
    assert len(vqa) == NUM_TRAIN
    sample = vqa.get_sample(0, derive_rng(0))
    assert sample.masks == [] and 2 <= len(sample.turns) <= 4
    reason = build_source_dataset("reason_seg", "ReasonSeg|train", str(synthetic_root), explanatory_rate=0.5,
                                  text_only_rate=0.2)
    for index in range(len(reason)):
        reason.get_sample(index, derive_rng(1, index)).validate()


def test_scene_texts_are_unambiguous() -> None:
    for index in range(30):
        scene = make_scene(derive_rng(11, index))
        image = render_scene(scene)
        assert image.shape in ((240, 320, 3), (320, 240, 3))
        names = [shape.name for shape in scene.shapes]
        assert len(set(names)) == len(names) and len({s.colour for s in scene.shapes}) == len(names)
        for shape_index in range(len(scene.shapes)):
            texts = referring_expressions(scene, shape_index)
            assert len(set(texts)) == len(texts)
            for other in range(len(scene.shapes)):  # no text names two shapes
                if other != shape_index:
                    assert not set(texts) & set(referring_expressions(scene, other))
                    assert not {q for q, _ in reasoning_queries(scene, shape_index)} & {
                        q for q, _ in reasoning_queries(scene, other)}
