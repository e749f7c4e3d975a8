"""Write synthetic shape scenes as a dataset root in the real on-disk formats.

The root holds (see ``dataset/README.md``)::

    synthetic.json                                   # marker: generator settings, suggested flags
    reason_seg/ReasonSeg/{train,val}/*.jpg + *.json   # labelme polygons, reasoning queries, target_names
    reason_seg/ReasonSeg/explanatory/train.json
    refer_seg/refcoco/refs(unc).p + instances.json    # splits "train" and "val"
    refer_seg/grefcoco/grefs(unc).json + instances.json   # multi-target and no-target refs
    refer_seg/images/mscoco/images/train2014/COCO_train2014_*.jpg
    ade20k/images/{training,validation}/*.jpg + ade20k/annotations/.../*.png
    ade20k/class_names.json                           # "background", "red circle", ...
    coco/train2017/*.jpg + llava_dataset/synthetic_vqa.json   # LLaVA-style conversations

Train and val scenes come from different random streams (val scenes are held out from every
training format). The output is a pure function of the seed and the counts: the same arguments
give byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data.rng import derive_rng, sample_without_replacement
from utils.data.synthetic import (
    COLOURS,
    SHAPE_KINDS,
    Scene,
    absent_expression,
    group_expressions,
    make_scene,
    reasoning_phrases,
    reasoning_queries,
    referring_expressions,
    render_scene,
    vqa_turns,
)

logger = logging.getLogger(__name__)

MARKER_FILE = "synthetic.json"
FORMAT_VERSION = 1
VQA_NAME = "synthetic_vqa"
JPEG_QUALITY = 92
SEM_SEG_CLASSES: tuple[str, ...] = ("background",) + tuple(f"{c} {k}" for c in COLOURS for k in SHAPE_KINDS)
"""ADE-style class names; label value ``i + 1`` is class ``i`` (0 stays "ignore")."""

GENERATED_PATHS: tuple[str, ...] = (
    MARKER_FILE, "reason_seg/ReasonSeg", "refer_seg/refcoco", "refer_seg/grefcoco",
    "refer_seg/images/mscoco", "ade20k", "coco/train2017", f"llava_dataset/{VQA_NAME}.json",
)
TRAIN_FLAGS: dict[str, str] = {
    "dataset": "sem_seg||refer_seg||vqa||reason_seg",
    "sample_rates": "3,3,1,3",
    "sem_seg_data": "ade20k",
    "refer_seg_data": "refcoco||grefcoco",
    "vqa_data": VQA_NAME,
    "reason_seg_data": "ReasonSeg|train",
    "val_dataset": "synthetic|val",
}
"""Training flags that read a synthetic root (also stored in its marker file)."""


@dataclass
class _Collected:
    """Annotation content gathered over all scenes before writing the index files."""

    coco_images: list[dict[str, Any]] = field(default_factory=list)
    coco_annotations: list[dict[str, Any]] = field(default_factory=list)
    refs: list[dict[str, Any]] = field(default_factory=list)
    grefs: list[dict[str, Any]] = field(default_factory=list)
    explanations: list[dict[str, Any]] = field(default_factory=list)
    vqa: list[dict[str, Any]] = field(default_factory=list)
    next_sentence_id: int = 1


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _write_json(path: str, content: Any, indent: int | None = None) -> None:
    _write_bytes(path, json.dumps(content, indent=indent).encode("utf-8"))


def _sentence_records(texts: list[str], collected: _Collected) -> list[dict[str, Any]]:
    records = []
    for text in texts:
        records.append({"tokens": text.split(), "raw": text, "sent_id": collected.next_sentence_id, "sent": text})
        collected.next_sentence_id += 1
    return records


def _pick(rng: np.random.Generator, items: list[Any], low: int, high: int) -> list[Any]:
    count = int(rng.integers(low, high + 1))
    return [items[i] for i in sample_without_replacement(rng, count, len(items))]


def _category_id(kind: str) -> int:
    return SHAPE_KINDS.index(kind) + 1


def _label_map(scene: Scene) -> np.ndarray:
    label = np.full((scene.height, scene.width), 1, dtype=np.uint8)  # 1 = "background" (class 0)
    for index, shape in enumerate(scene.shapes):
        label[scene.mask(index) > 0] = 1 + SEM_SEG_CLASSES.index(shape.name)
    return label


class SyntheticDatasetWriter:
    """Renders scenes and writes every format under ``root``."""

    def __init__(self, root: str, seed: int = 0, num_train: int = 500, num_val: int = 100) -> None:
        if num_train < 1 or num_val < 1:
            raise ValueError(f"need at least one train and one val scene, got {num_train}, {num_val}")
        self.root = root
        self.seed = seed
        self.num_train = num_train
        self.num_val = num_val
        self.collected = _Collected()

    def path(self, *parts: str) -> str:
        """A path under the root."""
        return os.path.join(self.root, *parts)

    def write(self, show_progress: bool = False) -> dict[str, Any]:
        """Generate all scenes and write all files; return the marker content."""
        scenes = [("train", i) for i in range(self.num_train)] + [("val", i) for i in range(self.num_val)]
        progress = tqdm(scenes, desc="synthetic scenes", disable=not show_progress)
        for image_id, (split, index) in enumerate(progress, start=1):
            self._write_scene(split, index, image_id)
        self._write_index_files()
        marker = {
            "generator": "tools/make_synthetic.py",
            "format_version": FORMAT_VERSION,
            "seed": self.seed,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "sem_seg_classes": list(SEM_SEG_CLASSES),
            "train_flags": TRAIN_FLAGS,
            "val_datasets": ["synthetic|val", "synthetic|refer_val", "synthetic|grefer_val", "ReasonSeg|val",
                             "refcoco|unc|val", "grefcoco|unc|val"],
        }
        _write_json(self.path(MARKER_FILE), marker, indent=2)
        return marker

    def _write_scene(self, split: str, index: int, image_id: int) -> None:
        scene = make_scene(derive_rng(self.seed, "scene", split, index))
        rng = derive_rng(self.seed, "text", split, index)
        jpeg = _jpeg_bytes(render_scene(scene))
        ann_ids = self._write_coco_instances(scene, split, image_id, jpeg)
        self._write_reason_seg(scene, split, image_id, jpeg, rng)
        self._add_refs(scene, split, image_id, ann_ids, rng)
        self._add_grefs(scene, split, image_id, ann_ids, rng)
        self._write_ade(scene, split, image_id, jpeg)
        if split == "train":
            self._write_vqa(scene, image_id, jpeg, rng)

    def _write_coco_instances(self, scene: Scene, split: str, image_id: int, jpeg: bytes) -> list[int]:
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _write_bytes(self.path("refer_seg", "images", "mscoco", "images", "train2014", file_name), jpeg)
        self.collected.coco_images.append(
            {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width}
        )
        ann_ids = []
        for shape_index, shape in enumerate(scene.shapes):
            ann_id = image_id * 10 + shape_index + 1
            xs, ys = shape.polygon[:, 0], shape.polygon[:, 1]
            self.collected.coco_annotations.append({
                "id": ann_id,
                "image_id": image_id,
                "category_id": _category_id(shape.kind),
                "segmentation": [[float(v) for v in shape.polygon.reshape(-1)]],
                "area": int(scene.mask(shape_index).sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())],
                "iscrowd": 0,
            })
            ann_ids.append(ann_id)
        return ann_ids

    def _write_reason_seg(self, scene: Scene, split: str, image_id: int, jpeg: bytes, rng: np.random.Generator) -> None:
        name = f"synthetic_{image_id:06d}"
        target = int(rng.integers(len(scene.shapes)))
        is_sentence = bool(rng.random() < 0.5)
        shape = scene.shapes[target]
        phrases = reasoning_phrases(scene, target)
        if is_sentence:
            candidates = reasoning_queries(scene, target)
        else:
            candidates = [(text, f"It is the {shape.name}.") for text in referring_expressions(scene, target)]
        chosen = _pick(rng, candidates, 1, 3 if split == "train" else 2)
        folder = self.path("reason_seg", "ReasonSeg", split)
        _write_bytes(os.path.join(folder, f"{name}.jpg"), jpeg)
        _write_json(os.path.join(folder, f"{name}.json"), {
            "text": [query for query, _ in chosen],
            "is_sentence": is_sentence,
            # What a named answer calls the target (--answer_style named): a short query itself,
            # a sentence's short form.
            "target_names": [phrases.get(query, query) for query, _ in chosen],
            "shapes": [{
                "label": "target",
                "points": shape.polygon.tolist(),
                "group_id": None,
                "shape_type": "polygon",
                "flags": {},
            }],
            "imagePath": f"{name}.jpg",
            "imageHeight": scene.height,
            "imageWidth": scene.width,
        }, indent=2)
        if split == "train":
            self.collected.explanations.append({"image": f"{name}.jpg", "query": chosen[0][0], "outputs": chosen[0][1]})

    def _add_refs(self, scene: Scene, split: str, image_id: int, ann_ids: list[int], rng: np.random.Generator) -> None:
        for shape_index, shape in enumerate(scene.shapes):
            sentences = _sentence_records(_pick(rng, referring_expressions(scene, shape_index), 1, 3), self.collected)
            ann_id = ann_ids[shape_index]
            self.collected.refs.append({
                "image_id": image_id,
                "split": split,
                "sentences": sentences,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "category_id": _category_id(shape.kind),
                "ann_id": ann_id,
                "sent_ids": [sentence["sent_id"] for sentence in sentences],
                "ref_id": len(self.collected.refs) + 1,
            })

    def _add_grefs(self, scene: Scene, split: str, image_id: int, ann_ids: list[int], rng: np.random.Generator) -> None:
        single = int(rng.integers(len(scene.shapes)))
        entries: list[tuple[list[str], list[int]]] = [
            (_pick(rng, referring_expressions(scene, single), 1, 2), [single])
        ]
        entries.extend(([text], members) for text, members in group_expressions(scene))
        if split == "val" or rng.random() < 0.5:
            entries.append(([absent_expression(scene, rng)], []))
        for texts, members in entries:
            self.collected.grefs.append({
                "image_id": image_id,
                "split": split,
                "sentences": _sentence_records(texts, self.collected),
                "ann_id": [ann_ids[i] for i in members] or [-1],
                "category_id": [_category_id(scene.shapes[i].kind) for i in members] or [-1],
                "no_target": not members,
                "ref_id": len(self.collected.grefs) + 1,
            })

    def _write_ade(self, scene: Scene, split: str, image_id: int, jpeg: bytes) -> None:
        folder, prefix = ("training", "ADE_train") if split == "train" else ("validation", "ADE_val")
        name = f"{prefix}_{image_id:08d}"
        _write_bytes(self.path("ade20k", "images", folder, f"{name}.jpg"), jpeg)
        buffer = io.BytesIO()
        Image.fromarray(_label_map(scene)).save(buffer, format="PNG")
        _write_bytes(self.path("ade20k", "annotations", folder, f"{name}.png"), buffer.getvalue())

    def _write_vqa(self, scene: Scene, image_id: int, jpeg: bytes, rng: np.random.Generator) -> None:
        file_name = f"{image_id:012d}.jpg"
        _write_bytes(self.path("coco", "train2017", file_name), jpeg)
        conversations = []
        for turn, (question, answer) in enumerate(vqa_turns(scene, rng)):
            conversations.append({"from": "human", "value": f"<image>\n{question}" if turn == 0 else question})
            conversations.append({"from": "gpt", "value": answer})
        self.collected.vqa.append({"id": f"{image_id:012d}", "image": file_name, "conversations": conversations})

    def _write_index_files(self) -> None:
        collected = self.collected
        instances = {
            "info": {"description": "synthetic shapes"},
            "images": collected.coco_images,
            "annotations": collected.coco_annotations,
            "categories": [{"id": _category_id(kind), "name": kind, "supercategory": "shape"} for kind in SHAPE_KINDS],
        }
        for name in ("refcoco", "grefcoco"):
            _write_json(self.path("refer_seg", name, "instances.json"), instances)
        _write_bytes(self.path("refer_seg", "refcoco", "refs(unc).p"), pickle.dumps(collected.refs, protocol=2))
        _write_json(self.path("refer_seg", "grefcoco", "grefs(unc).json"), collected.grefs)
        _write_json(self.path("reason_seg", "ReasonSeg", "explanatory", "train.json"), collected.explanations)
        _write_json(self.path("ade20k", "class_names.json"), list(SEM_SEG_CLASSES))
        _write_json(self.path("llava_dataset", f"{VQA_NAME}.json"), collected.vqa)


def is_synthetic_root(path: str) -> bool:
    """Whether ``path`` holds a synthetic dataset (its marker file)."""
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def prepare_output_dir(root: str, overwrite: bool) -> None:
    """Make ``root`` ready: create it, or clear a previous synthetic output if ``overwrite``.

    Raises:
        FileExistsError: ``root`` is not empty and is not a synthetic root (never deleted), or
            is one and ``overwrite`` is False.
    """
    if not os.path.isdir(root) or not os.listdir(root):
        os.makedirs(root, exist_ok=True)
        return
    if not is_synthetic_root(root):
        raise FileExistsError(f"{root} is not empty and holds no {MARKER_FILE}: refusing to write into it")
    if not overwrite:
        raise FileExistsError(
            f"{root} already holds a synthetic dataset; pass overwrite=True (--overwrite) to replace it"
        )
    for relative in GENERATED_PATHS:
        target = os.path.join(root, relative)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.isfile(target):
            os.remove(target)


def write_synthetic_dataset(
    root: str, seed: int = 0, num_train: int = 500, num_val: int = 100, overwrite: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Generate a synthetic dataset root (see the module docstring); return its marker content."""
    prepare_output_dir(root, overwrite)
    marker = SyntheticDatasetWriter(root, seed, num_train, num_val).write(show_progress)
    logger.info("synthetic dataset written to %s (%d train, %d val scenes)", root, num_train, num_val)
    return marker
