"""Tiny dataset files in each real on-disk format, written by hand for the data-layer tests."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

WIDTH, HEIGHT = 40, 30


def write_image(path: Path, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """A random RGB image saved losslessly-enough (PNG content under any name is not used:
    JPEG for .jpg); returns the array written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return image


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    """Corners of an axis-aligned rectangle, labelme point style."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def rect_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A COCO flat polygon of a rectangle."""
    return [float(v) for point in rect(x0, y0, x1, y1) for v in point]


def rect_mask(x0: int, y0: int, x1: int, y1: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """A JSON-able compressed RLE (counts as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """An uncompressed RLE (counts as a list, column-major)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def write_reason_seg(root: Path) -> dict[str, Any]:
    """ReasonSeg with a cp1252 train JSON (target/ignore/flag), a val split and explanations."""
    folder = root / "reason_seg" / "ReasonSeg"
    write_image(folder / "train" / "a.jpg")
    content = {
        "text": ["the caf\u00e9\u2019s sign", "the big box", "where would you sit?"],
        "is_sentence": False,
        "shapes": [  # file order differs from the fill order (largest first)
            {"label": "target", "points": rect(7, 6, 9, 8)},
            {"label": "ignore", "points": rect(5, 5, 15, 10)},
            {"label": "target", "points": rect(0, 0, 30, 20)},
            {"label": "flag", "points": rect(0, 0, 39, 29)},
        ],
    }
    (folder / "train" / "a.json").write_bytes(json.dumps(content, ensure_ascii=False).encode("cp1252"))
    write_image(folder / "val" / "b.jpg", seed=1)
    (folder / "val" / "b.json").write_text(json.dumps({
        "text": ["What would you use to sit down?", "Where can one rest?"],
        "is_sentence": True,
        "shapes": [{"label": "target", "points": rect(2, 3, 12, 13)}],
    }))
    write_image(folder / "val" / "c.jpg", seed=2)
    (folder / "val" / "c.json").write_text(json.dumps({
        "text": ["the lamp"], "is_sentence": False, "shapes": [{"label": "target", "points": rect(20, 5, 30, 25)}],
    }))
    (folder / "explanatory").mkdir(parents=True)
    (folder / "explanatory" / "train.json").write_text(json.dumps(
        [{"image": "a.jpg", "query": "the big box", "outputs": "The box is big because it is large."}]
    ))
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[0:21, 0:31] = 1
    expected[5:11, 5:16] = 255
    expected[6:9, 7:10] = 1
    return {"train_mask": expected, "val_mask_b": rect_mask(2, 3, 12, 13)}


def coco_instances(images: list[tuple[int, str]], annotations: list[dict[str, Any]],
                   categories: list[tuple[int, str]]) -> dict[str, Any]:
    return {
        "images": [{"id": i, "file_name": name, "height": HEIGHT, "width": WIDTH} for i, name in images],
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in categories],
    }


def ann(ann_id: int, image_id: int, category_id: int, segmentation: Any, iscrowd: int = 0) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": iscrowd, "area": 1.0, "bbox": [0, 0, 1, 1]}


def sentence(text: str, sent_id: int) -> dict[str, Any]:
    return {"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id}


def write_refcoco(root: Path) -> dict[str, np.ndarray]:
    """refcoco with polygon, compressed-RLE and uncompressed-RLE annotations, train/val/testA."""
    image_dir = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    for image_id in (1, 2):
        write_image(image_dir / f"COCO_train2014_{image_id:012d}.jpg", seed=image_id)
    masks = {
        "polygon": rect_mask(1, 1, 10, 10),
        "rle": rect_mask(20, 5, 35, 25),
        "uncompressed": rect_mask(5, 15, 15, 28),
    }
    instances = coco_instances(
        [(1, "COCO_train2014_000000000001.jpg"), (2, "COCO_train2014_000000000002.jpg")],
        [
            ann(101, 1, 1, [rect_polygon(1, 1, 10, 10)]),
            ann(102, 1, 2, compressed_rle(masks["rle"])),
            ann(201, 2, 1, uncompressed_rle(masks["uncompressed"]), iscrowd=1),
        ],
        [(1, "person"), (2, "dog")],
    )
    refs = [
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [sentence("man on left", 1), sentence("left guy", 2)]},
        {"ref_id": 2, "ann_id": 102, "image_id": 1, "split": "train", "category_id": 2,
         "sentences": [sentence("the dog", 3)]},
        {"ref_id": 3, "ann_id": 201, "image_id": 2, "split": "val", "category_id": 1,
         "sentences": [sentence("crowd", 4), sentence("people", 5)]},
        {"ref_id": 4, "ann_id": 102, "image_id": 1, "split": "testA", "category_id": 2,
         "sentences": [sentence("brown dog", 6)]},
    ]
    folder = root / "refer_seg" / "refcoco"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return masks


def write_grefcoco(root: Path) -> dict[str, np.ndarray]:
    """gRefCOCO: one multi-target ref, one single-target ref and one no-target ref."""
    image_dir = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    write_image(image_dir / "COCO_train2014_000000000003.jpg", seed=3)
    instances = coco_instances(
        [(3, "COCO_train2014_000000000003.jpg")],
        [
            ann(301, 3, 1, compressed_rle(rect_mask(0, 0, 9, 9))),
            ann(302, 3, 1, [compressed_rle(rect_mask(20, 10, 29, 19))]),
        ],
        [(1, "person")],
    )
    grefs = [
        {"ref_id": 1, "image_id": 3, "split": "val", "ann_id": [301, 302], "category_id": [1, 1], "no_target": False,
         "sentences": [sentence("both people", 1)]},
        {"ref_id": 2, "image_id": 3, "split": "val", "ann_id": [-1], "category_id": [-1], "no_target": True,
         "sentences": [sentence("the giraffe", 2)]},
        {"ref_id": 3, "image_id": 3, "split": "val", "ann_id": [302], "category_id": [1], "no_target": False,
         "sentences": [sentence("right person", 3)]},
    ]
    folder = root / "refer_seg" / "grefcoco"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "grefs(unc).json").write_text(json.dumps(grefs))
    return {"union": np.maximum(rect_mask(0, 0, 9, 9), rect_mask(20, 10, 29, 19)), "right": rect_mask(20, 10, 29, 19)}


def write_label_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


def stripes_label(values: tuple[int, int, int]) -> np.ndarray:
    """A label map with three vertical stripes of the given values."""
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    label[:, :10], label[:, 10:25], label[:, 25:] = values
    return label


def write_ade20k(root: Path, values: tuple[int, int, int] = (0, 1, 5)) -> np.ndarray:
    write_image(root / "ade20k" / "images" / "training" / "ADE_train_00000001.jpg")
    label = stripes_label(values)
    write_label_png(root / "ade20k" / "annotations" / "training" / "ADE_train_00000001.png", label)
    return label


def write_cocostuff(root: Path) -> np.ndarray:
    write_image(root / "coco" / "train2017" / "000000000009.jpg")
    label = stripes_label((255, 0, 95))  # unlabeled, person, building-other
    write_label_png(root / "cocostuff" / "train2017" / "000000000009.png", label)
    return label


def write_mapillary(root: Path, rgb: bool = False) -> None:
    mapillary = root / "mapillary"
    labels = [
        {"name": "construction--flat--road", "readable": "Road", "color": [128, 64, 128]},
        {"name": "object--vehicle--car", "readable": "Car", "color": [0, 0, 142]},
        {"name": "void--unlabeled", "readable": "Unlabeled", "color": [0, 0, 0]},
    ]
    mapillary.mkdir(parents=True, exist_ok=True)
    (mapillary / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    write_image(mapillary / "training" / "images" / "m1.jpg")
    label = stripes_label((0, 1, 2))
    if rgb:
        colours = np.array([label_info["color"] for label_info in labels], dtype=np.uint8)
        write_label_png(mapillary / "training" / "v2.0" / "labels" / "m1.png", colours[label])
    else:
        write_label_png(mapillary / "training" / "v2.0" / "labels" / "m1.png", label)


def write_paco(root: Path) -> None:
    write_image(root / "coco" / "train2017" / "000000000042.jpg")
    content = coco_instances(
        [(42, "train2017/000000000042.jpg")],
        [
            ann(1, 42, 7, [rect_polygon(0, 0, 5, 5)]),
            ann(2, 42, 7, [rect_polygon(30, 20, 35, 25)]),
            ann(3, 42, 8, [rect_polygon(10, 10, 20, 20)]),
        ],
        [(7, "car_(automobile):wheel"), (8, "bottle")],
    )
    path = root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(content))


def write_pascal_part(root: Path) -> None:
    folder = root / "vlpart" / "pascal_part"
    write_image(folder / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000001.jpg")
    content = coco_instances(
        [(5, "2008_000001.jpg")],
        [ann(1, 5, 3, [rect_polygon(2, 2, 12, 12)])],
        [(3, "aeroplane:body")],
    )
    (folder / "train.json").write_text(json.dumps(content))


def write_llava(root: Path) -> None:
    write_image(root / "coco" / "train2017" / "000000000077.jpg")
    records = [
        {"id": "77", "image": "000000000077.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Many colours."},
        ]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    folder = root / "llava_dataset"
    folder.mkdir(parents=True)
    (folder / "llava_instruct_150k.json").write_text(json.dumps(records))


def write_generic_coco(root: Path, with_sentences: bool) -> tuple[str, str]:
    image_dir = root / "mine" / "images"
    write_image(image_dir / "x.jpg")
    annotations = [ann(1, 1, 1, [rect_polygon(0, 0, 10, 10)]), ann(2, 1, 1, [rect_polygon(20, 0, 30, 10)]),
                   ann(3, 1, 2, [rect_polygon(0, 15, 10, 25)])]
    if with_sentences:
        annotations[0]["sentences"] = [{"sent": "the left cup"}]
        annotations[2]["caption"] = "a plate at the bottom"
    content = coco_instances([(1, "x.jpg")], annotations, [(1, "cup"), (2, "plate")])
    path = root / "mine" / "instances.json"
    path.write_text(json.dumps(content))
    return os.path.relpath(path, root), os.path.relpath(image_dir, root)
