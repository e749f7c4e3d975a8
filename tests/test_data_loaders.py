"""Each loader against hand-made files in the real on-disk format."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from utils.data import (
    SEG_TOKEN,
    Ade20kDataset,
    CocoStuffDataset,
    CorruptSampleError,
    GRefCocoDataset,
    LlavaVqaDataset,
    MapillaryDataset,
    PacoLvisDataset,
    PascalPartDataset,
    ReasonSegDataset,
    ReferSegDataset,
    build_source_dataset,
    build_val_dataset,
    load_image_rgb,
)
from utils.data.coco_format import segmentation_to_mask
from utils.data.reason_seg import read_annotation
from utils.data.rng import derive_rng


def check_contract(sample) -> None:
    sample.validate()
    assert len(sample.requests) == len(sample.turns) == len(sample.meta["no_target"])
    assert all("<image>" not in question for question, _ in sample.turns)


# --- images -------------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))  # 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image_rgb(tmp_path / "rotated.jpg").shape == (20, 10, 3)


def _save_with_orientation(path: Path, array: np.ndarray, orientation: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, quality=100, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6])  # 180 degrees; 90 degrees (width and height swap)
def test_coco_style_annotations_index_the_stored_pixels_whatever_the_exif(tmp_path: Path, orientation: int) -> None:
    """COCO polygons / RLE and label maps were made on the stored pixels: the image is read as
    stored (an EXIF turn would misplace every mask, or make the sizes disagree)."""
    import json
    import pickle

    stored = np.zeros((fx.HEIGHT, fx.WIDTH, 3), np.uint8)
    stored[0:10, 0:10] = 255  # a bright block at the stored top left, which the annotations mark
    _save_with_orientation(tmp_path / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg",
                           stored, orientation)
    instances = fx.coco_instances([(1, "COCO_train2014_000000000001.jpg")],
                                  [fx.ann(101, 1, 1, fx.compressed_rle(fx.rect_mask(0, 0, 9, 9)))], [(1, "box")])
    (tmp_path / "refer_seg/refcoco").mkdir(parents=True)
    (tmp_path / "refer_seg/refcoco/instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "val", "category_id": 1,
             "sentences": [fx.sentence("white box", 1)]}]
    (tmp_path / "refer_seg/refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    sample = ReferSegDataset(str(tmp_path), "refcoco", split="val", mode="val")[0]
    bright = sample.image[..., 0] > 128
    assert sample.image.shape[:2] == (fx.HEIGHT, fx.WIDTH) and (bright & (sample.masks[0] == 1)).sum() == 100

    _save_with_orientation(tmp_path / "ade20k/images/training/ADE_train_00000001.jpg", stored, orientation)
    label = np.ones((fx.HEIGHT, fx.WIDTH), np.uint8)
    label[0:10, 0:10] = 5  # "tree"
    fx.write_label_png(tmp_path / "ade20k/annotations/training/ADE_train_00000001.png", label)
    sample = build_source_dataset("sem_seg", "ade20k", str(tmp_path), mode="val")[0]
    tree = sample.masks[sample.requests.index("tree")]
    assert ((sample.image[..., 0] > 128) & (tree == 1)).sum() == 100 == tree.sum()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    from model.sam import SamTransform

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as image:
        assert image.mode.startswith("I")
        via_sam = SamTransform(64).preprocess(image)
    loaded = load_image_rgb(tmp_path / "gray16.png")
    np.testing.assert_array_equal(loaded[..., 0], (gradient >> 8).astype(np.uint8))
    assert 120 < loaded.mean() < 135  # PIL's own conversion clips: about 254
    assert 120 < via_sam.pixel_values[:, :16].float().mean() < 135


def test_corrupt_and_missing_images_raise_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    for name in ("bad.jpg", "missing.jpg"):
        with pytest.raises(CorruptSampleError, match=name):
            load_image_rgb(tmp_path / name)


# --- ReasonSeg ----------------------------------------------------------------------------------


def test_reason_seg_cp1252_fill_order_and_values(tmp_path: Path) -> None:
    expected = fx.write_reason_seg(tmp_path)
    json_path = tmp_path / "reason_seg" / "ReasonSeg" / "train" / "a.json"
    with pytest.raises(UnicodeDecodeError):
        json_path.read_bytes().decode("utf-8")
    annotation = read_annotation(str(json_path), fx.HEIGHT, fx.WIDTH)
    np.testing.assert_array_equal(annotation.mask, expected["train_mask"])
    assert annotation.queries[0] == "the caf\u00e9\u2019s sign"
    assert annotation.is_sentence is False


def test_reason_seg_train_samples_queries_with_the_same_mask(tmp_path: Path) -> None:
    expected = fx.write_reason_seg(tmp_path)
    dataset = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=0.0, text_only_rate=0.0,
                               num_questions_per_image=2)
    assert len(dataset) == 1
    sample = dataset[0]
    check_contract(sample)
    assert len(sample.turns) == 2 and len(set(sample.requests)) == 2
    for mask in sample.masks:
        np.testing.assert_array_equal(mask, expected["train_mask"])
    assert sample.meta["answer_kind"] == "mask" and sample.meta["is_sentence"] is False
    assert sample.image_path.endswith(os.path.join("train", "a.jpg"))


def test_reason_seg_explanatory_and_text_only_answers(tmp_path: Path) -> None:
    fx.write_reason_seg(tmp_path)
    explained = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=1.0, text_only_rate=0.0)[0]
    check_contract(explained)
    assert explained.meta["answer_kind"] == "mask+explanation"
    assert all(answer.count(SEG_TOKEN) == 1 and "because it is large" in answer for _, answer in explained.turns)
    assert all("explain" in question or "explanation" in question for question, _ in explained.turns)
    text_only = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=0.0, text_only_rate=1.0)[0]
    check_contract(text_only)
    assert text_only.masks == [] and all(SEG_TOKEN not in answer for _, answer in text_only.turns)


def test_reason_seg_val_has_one_item_per_query(tmp_path: Path) -> None:
    expected = fx.write_reason_seg(tmp_path)
    dataset = build_val_dataset("ReasonSeg|val", str(tmp_path), reason_seg_queries="all")
    assert len(dataset) == 3  # b.json: 2 queries, c.json: 1
    first, second = dataset[0], dataset[1]
    assert first.requests == ["What would you use to sit down?"] and second.requests == ["Where can one rest?"]
    assert first.turns == [("What would you use to sit down? Please output segmentation mask.", "[SEG].")]
    np.testing.assert_array_equal(first.masks[0], expected["val_mask_b"])
    assert first.meta["is_sentence"] is True
    assert dataset[1].turns == dataset[1].turns  # deterministic
    # The default (test.py's and training validation's): the first query of each image, as LISA.
    assert len(build_val_dataset("ReasonSeg|val", str(tmp_path))) == 2
    assert len(ReasonSegDataset(str(tmp_path), "val", mode="val")) == 2
    assert len(ReasonSegDataset(str(tmp_path), "train_val")) == 3


def test_reason_seg_val_counts_a_corrupt_annotation_as_one_unreadable_item(tmp_path: Path, caplog) -> None:
    fx.write_reason_seg(tmp_path)
    (tmp_path / "reason_seg" / "ReasonSeg" / "val" / "c.json").write_text('{"text": ["trunc')
    with caplog.at_level("WARNING"):
        dataset = build_val_dataset("ReasonSeg|val", str(tmp_path))  # builds: one bad file is no error
    assert len(dataset) == 2 and "c.json" in caplog.text
    dataset[0]
    with pytest.raises(CorruptSampleError, match="c.json"):  # evaluation counts it unreadable
        dataset[1]


def test_reason_seg_shapes_of_equal_area_fill_in_the_references_order() -> None:
    """LISA fills by ``np.argsort(areas)[::-1]``: of two shapes of equal area the first in the
    file is drawn last, on top."""
    from utils.data.reason_seg import rasterize_shapes

    shapes = [{"label": "target", "points": fx.rect(0, 0, 10, 10)}, {"label": "ignore", "points": fx.rect(5, 5, 15, 15)}]
    assert rasterize_shapes(shapes, 30, 40)[7, 7] == 1
    assert rasterize_shapes(shapes[::-1], 30, 40)[7, 7] == 255


def test_reason_seg_missing_split_lists_found_splits(tmp_path: Path) -> None:
    fx.write_reason_seg(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        build_val_dataset("ReasonSeg|test", str(tmp_path))
    message = str(error.value)
    assert os.path.join("ReasonSeg", "test") in message and "train" in message and "val" in message


# --- referring ----------------------------------------------------------------------------------


def test_segmentation_decoding_formats() -> None:
    mask = fx.rect_mask(3, 4, 12, 20)
    np.testing.assert_array_equal(segmentation_to_mask(fx.compressed_rle(mask), fx.HEIGHT, fx.WIDTH), mask)
    np.testing.assert_array_equal(segmentation_to_mask([fx.compressed_rle(mask)], fx.HEIGHT, fx.WIDTH), mask)
    np.testing.assert_array_equal(segmentation_to_mask(fx.uncompressed_rle(mask), fx.HEIGHT, fx.WIDTH), mask)
    polygon = segmentation_to_mask([fx.rect_polygon(3, 4, 12, 20)], fx.HEIGHT, fx.WIDTH)
    assert polygon[8, 8] == 1 and polygon[0, 0] == 0 and abs(int(polygon.sum()) - int(mask.sum())) < 40
    assert segmentation_to_mask([], fx.HEIGHT, fx.WIDTH).sum() == 0


def test_refcoco_polygon_and_rle_train(tmp_path: Path) -> None:
    masks = fx.write_refcoco(tmp_path)
    dataset = ReferSegDataset(str(tmp_path), "refcoco", split="train", num_questions_per_image=3)
    assert len(dataset) == 1  # one image has train refs
    sample = dataset[0]
    check_contract(sample)
    assert len(sample.turns) == 3 and sample.dataset == "refcoco"
    by_ref = dict(zip(sample.meta["ref_ids"], sample.masks))
    assert set(sample.meta["ref_ids"][:2]) == {1, 2}  # distinct refs before repeated sentences
    np.testing.assert_array_equal(by_ref[2], masks["rle"])
    assert by_ref[1][5, 5] == 1 and by_ref[1][20, 30] == 0
    assert sample.image_path.endswith(os.path.join("train2014", "COCO_train2014_000000000001.jpg"))


def test_refcoco_val_items_and_uncompressed_crowd(tmp_path: Path) -> None:
    masks = fx.write_refcoco(tmp_path)
    dataset = build_val_dataset("refcoco|unc|val", str(tmp_path))
    assert len(dataset) == 2  # ref 3 has two sentences
    samples = [dataset[i] for i in range(2)]
    assert [s.requests for s in samples] == [["crowd"], ["people"]]
    assert samples[0].turns == [("What is crowd in this image? Please output segmentation mask.", "[SEG].")]
    np.testing.assert_array_equal(samples[0].masks[0], masks["uncompressed"])  # crowd-only target is the target
    assert len(build_val_dataset("refcoco|unc|testA", str(tmp_path))) == 1


def test_refcoco_missing_split_and_file_errors(tmp_path: Path) -> None:
    fx.write_refcoco(tmp_path)
    with pytest.raises(ValueError, match=r"testB.*splits found: \['testA', 'train', 'val'\]"):
        build_val_dataset("refcoco|unc|testB", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p.*refs\(unc\)\.p"):
        build_val_dataset("refcoco|umd|val", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="refcoco\\+"):
        build_val_dataset("refcoco+|unc|val", str(tmp_path))


def test_grefcoco_multi_target_union_and_no_target(tmp_path: Path) -> None:
    masks = fx.write_grefcoco(tmp_path)
    dataset = build_val_dataset("grefcoco|unc|val", str(tmp_path))
    assert isinstance(dataset, GRefCocoDataset) and len(dataset) == 3
    multi, empty, single = dataset[0], dataset[1], dataset[2]
    for sample in (multi, empty, single):
        check_contract(sample)
    np.testing.assert_array_equal(multi.masks[0], masks["union"])
    assert multi.turns[0][1] == "[SEG]." and multi.meta["no_target"] == [False]
    assert empty.masks == [] and SEG_TOKEN not in empty.turns[0][1]
    assert empty.meta["no_target"] == [True]
    assert len(empty.meta["no_target_gt"]) == 1
    assert empty.meta["no_target_gt"][0].shape == (fx.HEIGHT, fx.WIDTH) and empty.meta["no_target_gt"][0].sum() == 0
    np.testing.assert_array_equal(single.masks[0], masks["right"])
    train = GRefCocoDataset(str(tmp_path), split="val", mode="train", num_questions_per_image=3)[0]
    check_contract(train)
    assert sum(train.meta["no_target"]) == 1 and len(train.masks) == 2


# --- semantic segmentation ----------------------------------------------------------------------


def test_ade20k_ignores_zero_and_shifts_labels(tmp_path: Path) -> None:
    fx.write_ade20k(tmp_path)
    sample = build_source_dataset("sem_seg", "ade20k", str(tmp_path), mode="val")[0]
    check_contract(sample)
    assert sample.requests == ["wall", "tree"]  # labels 1 and 5 -> classes 0 and 4
    wall, tree = sample.masks
    assert (wall[:, :10] == 255).all() and (wall[:, 10:25] == 1).all() and (wall[:, 25:] == 0).all()
    assert (tree[:, :10] == 255).all() and (tree[:, 10:25] == 0).all() and (tree[:, 25:] == 1).all()
    assert sample.meta["class_ids"] == [0, 4]


def test_ade20k_class_names_override(tmp_path: Path) -> None:
    fx.write_ade20k(tmp_path, values=(1, 2, 3))
    (tmp_path / "ade20k" / "class_names.json").write_text('["background", "red circle", "blue square"]')
    sample = Ade20kDataset(str(tmp_path), mode="val")[0]
    assert sample.requests == ["background", "red circle", "blue square"]


def test_cocostuff_unlabeled_and_hyphenated_classes(tmp_path: Path) -> None:
    fx.write_cocostuff(tmp_path)
    dataset = CocoStuffDataset(str(tmp_path), mode="val")
    sample = dataset[0]
    assert sample.requests == ["person"]  # building-other is never asked
    mask = sample.masks[0]
    assert (mask[:, :10] == 255).all() and (mask[:, 10:25] == 1).all() and (mask[:, 25:] == 0).all()
    assert sample.image_path.endswith(os.path.join("coco", "train2017", "000000000009.jpg"))


@pytest.mark.parametrize("rgb", [False, True])
def test_mapillary_palette_and_rgb_labels(tmp_path: Path, rgb: bool) -> None:
    fx.write_mapillary(tmp_path, rgb=rgb)
    sample = MapillaryDataset(str(tmp_path), mode="val")[0]
    assert sample.requests == ["road", "car"]
    road, car = sample.masks
    assert (road[:, :10] == 1).all() and (road[:, 10:25] == 0).all() and (road[:, 25:] == 255).all()
    assert (car[:, 10:25] == 1).all()


def test_paco_lvis_part_names_and_union(tmp_path: Path) -> None:
    fx.write_paco(tmp_path)
    dataset = PacoLvisDataset(str(tmp_path), mode="val")
    assert len(dataset) == 2  # (image, category) pairs
    samples = [dataset[0], dataset[1]]
    assert [s.requests[0] for s in samples] == ["the wheel of the car", "bottle"]
    wheel = samples[0].masks[0]
    assert wheel[2, 2] == 1 and wheel[22, 32] == 1 and wheel[15, 15] == 0
    train = PacoLvisDataset(str(tmp_path), mode="train", num_questions_per_image=3)[0]
    check_contract(train)
    assert len(train.turns) == 2  # one turn per category, no repeated paraphrase
    assert set(train.requests) <= {"the wheel of the car", "car wheel", "bottle"}


def test_pascal_part_reads_voc_images(tmp_path: Path) -> None:
    fx.write_pascal_part(tmp_path)
    sample = PascalPartDataset(str(tmp_path), mode="val")[0]
    assert sample.requests == ["the body of the aeroplane"]
    assert sample.image_path.endswith(os.path.join("VOC2010", "JPEGImages", "2008_000001.jpg"))


# --- VQA and generic COCO -----------------------------------------------------------------------


def test_llava_turns_strip_image_placeholder(tmp_path: Path) -> None:
    fx.write_llava(tmp_path)
    dataset = LlavaVqaDataset(str(tmp_path))
    assert len(dataset) == 1  # the text-only record is left out
    sample = dataset.get_sample(0, derive_rng(0))
    check_contract(sample)
    assert sample.turns == [("What is in the picture?", "Noise."), ("What colour is it?", "Many colours.")]
    assert sample.masks == [] and sample.image_path.endswith(os.path.join("coco", "train2017", "000000000077.jpg"))


def test_generic_coco_categories_and_expressions(tmp_path: Path) -> None:
    annotations, images = fx.write_generic_coco(tmp_path, with_sentences=False)
    dataset = build_source_dataset("coco", f"{annotations}|{images}", str(tmp_path), mode="val")
    assert [dataset[i].requests for i in range(len(dataset))] == [["cup"], ["plate"]]
    cup = dataset[0].masks[0]
    assert cup[5, 5] == 1 and cup[5, 25] == 1 and cup[20, 5] == 0
    other = tmp_path / "other"
    annotations, images = fx.write_generic_coco(other, with_sentences=True)
    dataset = build_source_dataset("coco", f"{annotations}|{images}", str(other), mode="val")
    assert [dataset[i].requests for i in range(len(dataset))] == [["the left cup"], ["a plate at the bottom"]]
    assert dataset[0].masks[0][5, 25] == 0  # one annotation per expression


def test_unknown_names_list_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ade20k"):
        build_source_dataset("sem_seg", "partimagenet", str(tmp_path))
    with pytest.raises(ValueError, match="ReasonSeg"):
        build_val_dataset("nonsense", str(tmp_path))
