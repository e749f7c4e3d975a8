"""Malformed and unusual annotations: each is a readable CorruptSampleError or read as meant,
and the fast label-map mapping gives exactly the classes of the reference computation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from utils.data import CorruptSampleError, EmptySampleError, GRefCocoDataset, HybridDataset, ReasonSegDataset
from utils.data.coco_format import segmentation_to_mask
from utils.data.reason_seg import count_queries, read_annotation
from utils.data.rng import derive_rng
from utils.data.sem_seg import IGNORE_CLASS, LabelMapDataset
from utils.data.targets import union_mask
from utils.data.vqa import conversation_turns

# --- 1. malformed annotations are CorruptSampleError (the only error evaluation skips) ----------


def _write_json(path: Path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("bad_shape", ["oops", None, 3])
def test_reason_seg_shape_that_is_not_a_dict_is_corrupt_naming_the_file(tmp_path: Path, bad_shape) -> None:
    path = _write_json(tmp_path / "bad.json", {
        "text": ["a"], "is_sentence": False,
        "shapes": [{"label": "target", "points": fx.rect(1, 1, 9, 9)}, bad_shape],
    })
    with pytest.raises(CorruptSampleError, match="bad.json.*shape 1"):
        read_annotation(path, fx.HEIGHT, fx.WIDTH)


def test_rle_size_disagreeing_with_the_image_is_corrupt_naming_file_and_annotation() -> None:
    mask = fx.rect_mask(5, 5, 9, 9)
    transposed = {"id": 7, "segmentation": fx.compressed_rle(mask.T.copy()), "iscrowd": 0}
    with pytest.raises(ValueError, match=r"RLE size \[40, 30\]"):
        segmentation_to_mask(transposed["segmentation"], fx.HEIGHT, fx.WIDTH)
    with pytest.raises(CorruptSampleError, match="img.jpg target 3: bad segmentation of annotation 7"):
        union_mask([transposed], fx.HEIGHT, fx.WIDTH, "img.jpg target 3")
    # A matching size still decodes as before.
    good = {"id": 8, "segmentation": fx.compressed_rle(mask), "iscrowd": 0}
    np.testing.assert_array_equal(union_mask([good], fx.HEIGHT, fx.WIDTH, "img.jpg"), mask)


def test_annotation_of_the_wrong_type_is_corrupt() -> None:
    with pytest.raises(CorruptSampleError, match="annotation 9"):
        union_mask([{"id": 9, "segmentation": [{"counts": "x"}]}], fx.HEIGHT, fx.WIDTH, "img.jpg")  # no size


# --- 2. ReasonSeg "text" given as one string ---------------------------------------------------


def test_reason_seg_text_as_one_string_is_one_query(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "one.json", {
        "text": "the red cup on the left", "is_sentence": False,
        "shapes": [{"label": "target", "points": fx.rect(1, 1, 9, 9)}],
    })
    assert read_annotation(path, fx.HEIGHT, fx.WIDTH).queries == ["the red cup on the left"]
    assert count_queries(path) == 1


@pytest.mark.parametrize("text", [{"a": 1}, 3, None])
def test_reason_seg_text_neither_list_nor_string_is_corrupt(tmp_path: Path, text) -> None:
    path = _write_json(tmp_path / "odd.json", {"text": text, "is_sentence": False, "shapes": []})
    with pytest.raises(CorruptSampleError, match="odd.json"):
        read_annotation(path, fx.HEIGHT, fx.WIDTH)
    with pytest.raises(CorruptSampleError, match="odd.json"):
        count_queries(path)


# --- 3. label-map mapping: a lookup table, same classes as the reference ------------------------


def _reference_class_map(dataset: LabelMapDataset, label: np.ndarray) -> np.ndarray:
    """The computation before the lookup table (int64 copy, boolean mask, scatter)."""
    if label.ndim == 3:
        keys = (label[..., 0].astype(np.int64) << 16) | (label[..., 1].astype(np.int64) << 8) | label[..., 2]
        palette = np.asarray(dataset.palette, dtype=np.int64)
        palette_keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
        lookup = {int(key): index for index, key in enumerate(palette_keys)}
        unique, inverse = np.unique(keys, return_inverse=True)
        mapped = np.array([lookup.get(int(key), IGNORE_CLASS) for key in unique], dtype=np.int64)
        values = mapped[inverse].reshape(keys.shape)
    else:
        values = label.astype(np.int64)
    inside = (values >= 0) & (values < len(dataset.value_to_class))
    classes = np.full(values.shape, IGNORE_CLASS, dtype=np.int64)
    classes[inside] = dataset.value_to_class[values[inside]]
    return classes


def _reference_present(dataset: LabelMapDataset, class_map: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(class_map) if c != IGNORE_CLASS and dataset.askable[c]]


def _mapillary_like() -> LabelMapDataset:
    names = [f"class {i}" for i in range(124)] + ["unlabeled"]
    value_to_class = np.full(256, IGNORE_CLASS, dtype=np.int64)
    value_to_class[: len(names)] = np.arange(len(names))
    value_to_class[124] = IGNORE_CLASS  # the ignore value
    askable = [i % 7 != 3 and name != "unlabeled" for i, name in enumerate(names)]  # some never asked
    palette = np.random.default_rng(1).integers(0, 256, (len(names), 3))
    return LabelMapDataset(["x.jpg"], ["x.png"], names, value_to_class, askable, palette)


@pytest.mark.parametrize("dtype,high", [(np.uint8, 256), (np.uint16, 65536), (np.uint16, 300), (np.int32, 1000)])
def test_class_map_and_present_classes_equal_the_reference(dtype, high) -> None:
    dataset = _mapillary_like()
    rng = np.random.default_rng(0)
    for trial in range(4):
        label = rng.integers(0, high, (37, 53)).astype(dtype)  # values in, beyond and at the ignore value
        label[0, :3] = [124, 0, 123]
        if trial == 3:
            label[:] = 124  # nothing but ignore
        classes = dataset.class_map(label, "x.png")
        np.testing.assert_array_equal(classes, _reference_class_map(dataset, label))
        assert classes.shape == label.shape
        assert dataset.present_classes(classes) == _reference_present(dataset, classes)


def test_rgb_class_map_equals_the_reference() -> None:
    dataset = _mapillary_like()
    rng = np.random.default_rng(2)
    label = dataset.palette[rng.integers(0, len(dataset.palette), (31, 29))].astype(np.uint8)
    label[:4, :4] = [1, 2, 3]  # a colour not in the palette
    classes = dataset.class_map(label, "x.png")
    np.testing.assert_array_equal(classes, _reference_class_map(dataset, label))
    assert dataset.present_classes(classes) == _reference_present(dataset, classes)


def test_value_to_class_beyond_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"maps to \[5\]"):
        LabelMapDataset(["x.jpg"], ["x.png"], ["a", "b"], np.array([-1, 0, 1, 5]))


# --- 4. ReasonSeg files without a target pixel ---------------------------------------------------


def _only_ignore(root: Path, split: str, name: str, queries: list[str]) -> None:
    folder = root / "reason_seg" / "ReasonSeg" / split
    fx.write_image(folder / f"{name}.jpg")
    (folder / f"{name}.json").write_text(json.dumps({
        "text": queries, "is_sentence": False,
        "shapes": [{"label": "ignore", "points": fx.rect(1, 1, 9, 9)}, {"label": "flag", "points": fx.rect(0, 0, 5, 5)}],
    }))


def test_reason_seg_without_target_pixel_is_refused_in_training(tmp_path: Path) -> None:
    fx.write_reason_seg(tmp_path)
    _only_ignore(tmp_path, "train", "z", ["the thing"])
    dataset = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=0, text_only_rate=0)
    index = [i for i, path in enumerate(dataset.image_paths) if path.endswith("z.jpg")][0]
    with pytest.raises(EmptySampleError, match="z.json has no target pixel"):
        dataset.get_sample(index, derive_rng(0))
    # The sampler replaces it and counts the replacement.
    hybrid = HybridDataset({"reason_seg": [dataset]}, samples_per_epoch=8, seed=0)
    samples = [hybrid[i] for i in range(8)]
    assert all((sample.masks[0] == 1).any() for sample in samples)
    assert hybrid.num_skipped == sum(sample.meta["num_skipped"] for sample in samples) > 0


def test_reason_seg_without_target_pixel_is_kept_in_validation_with_one_warning(tmp_path: Path, caplog) -> None:
    fx.write_reason_seg(tmp_path)
    _only_ignore(tmp_path, "val", "z", ["first", "second"])
    dataset = ReasonSegDataset(str(tmp_path), "val", mode="val", val_queries="all")
    items = [i for i in range(len(dataset)) if dataset.item_path(i).endswith("z.jpg")]
    assert len(items) == 2
    with caplog.at_level(logging.WARNING, logger="utils.data.reason_seg"):
        samples = [dataset[i] for i in items]
    assert [sample.requests for sample in samples] == [["first"], ["second"]]
    assert all(set(np.unique(sample.masks[0])) == {0, 255} for sample in samples)
    assert caplog.text.count("z.json has no target pixel") == 1


# --- 5. a target with some of its annotations missing ----------------------------------------------


def test_grefcoco_target_with_a_missing_annotation_is_corrupt_naming_it(tmp_path: Path, caplog) -> None:
    fx.write_grefcoco(tmp_path)
    grefs_path = tmp_path / "refer_seg" / "grefcoco" / "grefs(unc).json"
    grefs = json.loads(grefs_path.read_text())
    grefs.append({"ref_id": 4, "image_id": 3, "split": "val", "ann_id": [301, 399, 302], "category_id": [1, 1, 1],
                  "no_target": False, "sentences": [fx.sentence("three people", 4)]})
    grefs_path.write_text(json.dumps(grefs))
    with caplog.at_level(logging.WARNING, logger="utils.data.refer"):
        dataset = GRefCocoDataset(str(tmp_path), split="val", mode="val")
    assert len(dataset) == 4  # kept: evaluation counts the item as unreadable, not as absent
    position = [i for i, (p, _) in enumerate(dataset.val_items) if dataset.targets[p].target_id == 4][0]
    with pytest.raises(CorruptSampleError, match=r"annotations \[399\] of target 4"):
        dataset[position]
    assert "1 annotations named by refs are missing" in caplog.text and "of the 1 refs" in caplog.text
    assert dataset[0].masks[0].sum() > 0  # the complete targets read as before


# --- 6. VQA messages of one speaker in a row ------------------------------------------------------


def test_consecutive_messages_of_one_speaker_are_joined() -> None:
    messages = [
        {"from": "human", "value": "<image>\nLook at the sign."},
        {"from": "human", "value": "What does it say?"},
        {"from": "gpt", "value": "It says stop."},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Why?"},
        {"from": "gpt", "value": "Traffic rules."},
    ]
    assert conversation_turns(messages) == [
        ("Look at the sign.\nWhat does it say?", "It says stop.\nIt is red."),
        ("Why?", "Traffic rules."),
    ]


def test_alternating_conversation_turns_are_unchanged() -> None:
    messages = [
        {"from": "gpt", "value": "leading, dropped"},
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": " Noise. "},
        {"from": "human", "value": "unanswered"},
    ]
    assert conversation_turns(messages) == [("What is in the picture?", "Noise.")]


# --- fill order of ReasonSeg shapes ---------------------------------------------------------------


def test_reason_seg_fill_order_counts_outline_pixels_not_geometric_area() -> None:
    """A 10x10 box (121 pixels with its outline, area 100) and a 1 px wide pole (122 pixels,
    area 60): the reference fills the pole first and the box over it; ordering by
    ``cv2.contourArea`` would reverse that and change the mask."""
    from utils.data.reason_seg import rasterize_shapes

    shapes = [{"label": "ignore", "points": fx.rect(0, 0, 10, 10)}, {"label": "target", "points": fx.rect(5, 0, 6, 60)}]
    mask = rasterize_shapes(shapes, 70, 40)
    assert mask[5, 5] == 255 and mask[30, 5] == 1


def _full_size_area(polygon: np.ndarray, height: int, width: int) -> int:
    """The reference's ranking area: the shape drawn on a mask of the whole image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(mask, polygon, True, 1, 1)
    cv2.fillPoly(mask, polygon, 1)
    return int(mask.sum())


def _full_size_rasterization(shapes: list[dict], height: int, width: int) -> np.ndarray:
    drawable = []
    for shape in shapes:
        polygon = np.array([shape["points"]], dtype=np.int32)
        drawable.append((_full_size_area(polygon, height, width), polygon, 255 if shape["label"] == "ignore" else 1))
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in np.argsort([area for area, _, _ in drawable])[::-1]:
        _, polygon, value = drawable[index]
        cv2.polylines(mask, polygon, True, value, 1)
        cv2.fillPoly(mask, polygon, value)
    return mask


def _edge_case_polygons(height: int, width: int) -> list[list[list[float]]]:
    big = 2**31 - 1
    return [
        [[3, 4]], [[-5, 4]], [[width, height]], [[width - 1, height - 1]], [[0, 0]],  # one point
        [[2, 3], [17, 9]], [[-20, -7], [width + 9, height + 3]], [[5, -3], [5, height + 8]],  # two points
        [[0, 5], [10, 5], [25, 5]], [[-3, -3], [4, 4], [12, 12]],  # straight lines
        fx.rect(-10, -10, 5, 5), fx.rect(width - 4, height - 4, width + 20, height + 20), fx.rect(-10, 3, width + 10, 6),
        fx.rect(width, 0, width + 9, 9), fx.rect(-9, 0, -1, 9), fx.rect(0, height, 9, height + 9), fx.rect(0, -9, 9, -1),  # outside
        fx.rect(-50, -50, width + 50, height + 50),  # around the whole image
        [[-big - 1, 0], [big, 5], [3, big]], [[1e9, 2.7], [-1e9, 5.2], [3.9, 2e9]],  # extreme coordinates
        [[0, 0], [20, 20], [20, 0], [0, 20]],  # self-intersecting
        [[2.9, 3.1], [14.99, 3.5], [9.5, 12.7]],  # truncated like the reference
    ]


def test_reason_seg_area_in_the_bounding_box_equals_the_full_size_drawing() -> None:
    """Ranking areas are drawn in each polygon's box clipped to the image: the same integer as
    drawing it on the whole image for any polygon, and so the same fill order and mask."""
    from utils.data.reason_seg import _drawn_area, _polygon, rasterize_shapes

    rng = np.random.default_rng(0)
    shapes_by_image = []
    for trial in range(600):
        height, width = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        polygons = _edge_case_polygons(height, width) if trial % 50 == 0 else []
        for _ in range(int(rng.integers(1, 6))):
            span = int(rng.choice([3, 40, 200, 5000]))
            points = rng.integers(-span, span + 50, (int(rng.integers(1, 9)), 2))
            polygons.append((points + rng.random(points.shape) if rng.random() < 0.3 else points).tolist())
        for points in polygons:
            polygon = _polygon(points)
            assert _drawn_area(polygon, height, width) == _full_size_area(polygon, height, width), (points, height, width)
        labels = rng.choice(["target", "ignore"], len(polygons))
        shapes_by_image.append(([{"label": str(l), "points": p} for l, p in zip(labels, polygons)], height, width))
    for shapes, height, width in shapes_by_image:
        np.testing.assert_array_equal(rasterize_shapes(shapes, height, width), _full_size_rasterization(shapes, height, width))


# --- ReasonSeg photographs with an EXIF orientation: the size labelme recorded decides -----------


def _sideways_reason_seg(root: Path, recorded: tuple[int, int] | None, on_stored_pixels: bool) -> tuple[Path, np.ndarray]:
    """A val image stored 30 x 40 with EXIF orientation 6 (upright 40 x 30) and a bright block,
    and a JSON whose polygon outlines that block on the stored or on the upright pixels."""
    folder = root / "reason_seg" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    stored = np.zeros((fx.HEIGHT, fx.WIDTH, 3), np.uint8)
    stored[2:12, 4:16] = 255  # not symmetric: a turned image moves it
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.fromarray(stored).save(folder / "r.jpg", quality=100, exif=exif)
    block = np.argwhere(stored[..., 0] if on_stored_pixels else np.rot90(stored[..., 0], k=-1))
    (y0, x0), (y1, x1) = block.min(axis=0).tolist(), block.max(axis=0).tolist()
    content = {"text": ["the block"], "is_sentence": False, "shapes": [{"label": "target", "points": fx.rect(x0, y0, x1, y1)}]}
    if recorded is not None:
        content.update(imageHeight=recorded[0], imageWidth=recorded[1])
    return Path(_write_json(folder / "r.json", content)), stored


@pytest.mark.parametrize("recorded", [(fx.WIDTH, fx.HEIGHT), None])  # the upright size; none recorded
def test_reason_seg_json_of_the_upright_image_gets_it_upright(tmp_path: Path, recorded, caplog) -> None:
    _sideways_reason_seg(tmp_path, recorded, on_stored_pixels=False)
    with caplog.at_level(logging.WARNING, logger="utils.data.reason_seg"):
        sample = ReasonSegDataset(str(tmp_path), "val", mode="val")[0]
    assert sample.image.shape == (fx.WIDTH, fx.HEIGHT, 3)
    np.testing.assert_array_equal(sample.masks[0] == 1, sample.image[..., 0] > 128)
    assert "stored size" not in caplog.text


def test_reason_seg_json_of_the_stored_pixels_gets_them_with_one_warning(tmp_path: Path, caplog) -> None:
    """Labelme before EXIF support annotated the stored pixels: image and mask both as stored."""
    _, stored = _sideways_reason_seg(tmp_path, (fx.HEIGHT, fx.WIDTH), on_stored_pixels=True)
    dataset = ReasonSegDataset(str(tmp_path), "val", mode="val")
    with caplog.at_level(logging.WARNING, logger="utils.data.reason_seg"):
        samples = [dataset[0], dataset[0]]
    for sample in samples:
        assert sample.image.shape == stored.shape
        np.testing.assert_array_equal(sample.masks[0] == 1, sample.image[..., 0] > 128)
    assert caplog.text.count("r.json records the stored size 30x40") == 1


def test_reason_seg_json_of_another_size_is_refused_in_training_and_warned_in_evaluation(tmp_path: Path, caplog) -> None:
    """Training: a corrupt sample naming the file and both sizes. Evaluation: scored as LISA's
    evaluation scores it (polygons on the upright image), with one warning, so that a split keeps
    the items of the published numbers."""
    _sideways_reason_seg(tmp_path, (50, 60), on_stored_pixels=False)
    training = ReasonSegDataset(str(tmp_path), "val", mode="train")
    with pytest.raises(CorruptSampleError, match=r"r\.json records an image of 50x60 .* image is 40x30 \(30x40 as stored\)"):
        training.get_sample(0, np.random.default_rng(0))
    evaluation = ReasonSegDataset(str(tmp_path), "val", mode="val")
    with caplog.at_level("WARNING"):
        sample = evaluation[0]
        evaluation[0]
    assert sample.image.shape[:2] == (fx.WIDTH, fx.HEIGHT)  # upright
    assert caplog.text.count("records an image of 50x60") == 1
