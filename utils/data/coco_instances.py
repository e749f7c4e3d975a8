"""Sources in COCO instances format: PACO-LVIS, PASCAL-Part and users' own COCO files.

Each (image, category) pair is one target whose mask is the union of the category's instances
in the image (semantic style: "the wheel of the car" means all of them). A generic COCO file
whose annotations carry a text field (``sentences``, ``sentence``, ``caption``, ``expression``,
``referring_expression``) is read as referring data instead: one target per annotation.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from utils.data.base import Mode
from utils.data.coco_format import CocoIndex
from utils.data.targets import ImageRecord, Target, TargetDataset

logger = logging.getLogger(__name__)

TEXT_FIELDS: tuple[str, ...] = ("sentences", "sentence", "caption", "expression", "referring_expression")
"""Annotation fields read as referring expressions by :class:`CocoInstancesDataset`."""


def _clean(name: str) -> str:
    return name.split("_(")[0].replace("_", " ").strip()


def part_phrasings(category_name: str) -> tuple[str, ...]:
    """Requests for a (part) category: ``"car:wheel"`` -> ``("the wheel of the car", "car wheel")``.

    LVIS-style disambiguation suffixes (``"bow_(weapon)"``) are dropped, underscores become spaces.
    """
    pieces = category_name.strip().split(":")
    if len(pieces) == 1:
        return (_clean(pieces[0]),)
    whole, part = _clean(pieces[0]), _clean(":".join(pieces[1:]))
    return (f"the {part} of the {whole}", f"{whole} {part}")


def plain_phrasing(category_name: str) -> tuple[str, ...]:
    """The category name itself, underscores as spaces."""
    return (category_name.replace("_", " ").strip(),)


def category_targets(index: CocoIndex, phrasings: Callable[[str], tuple[str, ...]]) -> list[Target]:
    """One target per (image, category) present, texts from the category name."""
    targets: list[Target] = []
    for image_id in index.image_ids_with_annotations():
        by_category: dict[int, list[int]] = defaultdict(list)
        for annotation in index.annotations_by_image[image_id]:
            by_category[annotation["category_id"]].append(annotation["id"])
        for category_id in sorted(by_category):
            name = index.categories.get(category_id, {}).get("name", str(category_id))
            targets.append(Target(category_id, image_id, tuple(by_category[category_id]), phrasings(name)))
    return targets


def annotation_texts(annotation: dict[str, Any]) -> tuple[str, ...]:
    """The referring texts an annotation carries in any of :data:`TEXT_FIELDS`."""
    texts: list[str] = []
    for field in TEXT_FIELDS:
        value = annotation.get(field)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, dict):
                item = item.get("sent", item.get("raw"))
            if isinstance(item, str) and item.strip():
                texts.append(item.strip())
    return tuple(texts)


def expression_targets(index: CocoIndex) -> list[Target]:
    """One target per annotation that carries a text."""
    return [
        Target(annotation["id"], image_id, (annotation["id"],), annotation_texts(annotation))
        for image_id in index.image_ids_with_annotations()
        for annotation in index.annotations_by_image[image_id]
        if annotation_texts(annotation)
    ]


def _image_records(index: CocoIndex, image_path: Callable[[str], str]) -> dict[int, ImageRecord]:
    return {
        image_id: ImageRecord(image_path(image["file_name"]), int(image["height"]), int(image["width"]))
        for image_id, image in index.images.items()
    }


def _annotations(index: CocoIndex) -> dict[int, dict[str, Any]]:
    return {ann["id"]: ann for anns in index.annotations_by_image.values() for ann in anns}


class CocoCategoryDataset(TargetDataset):
    """A COCO instances file read as "one request per category present in the image".

    Items (see :class:`TargetDataset`): train: one per image with annotations, up to
    ``num_questions_per_image`` distinct categories; val: one per (image, category). Meta key of
    the ids: ``category_ids``.
    """

    target_id_key = "category_ids"

    def __init__(
        self,
        annotation_file: str,
        image_path: Callable[[str], str],
        phrasings: Callable[[str], tuple[str, ...]] = plain_phrasing,
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str = "coco",
    ) -> None:
        index = CocoIndex.from_file(annotation_file)
        super().__init__(
            category_targets(index, phrasings), _image_records(index, image_path), _annotations(index),
            mode, seed, num_questions_per_image, name, is_sentence=False, one_text_per_target=True,
        )
        logger.info("%s (%s): %d images, %d items from %s", name, mode, len(self.image_ids), len(self), annotation_file)


class PacoLvisDataset(CocoCategoryDataset):
    """PACO-LVIS: ``vlpart/paco/annotations/paco_lvis_v1_<split>.json``, images under ``coco/``
    (``file_name`` is ``train2017/...``). Categories ``object`` or ``object:part``."""

    def __init__(self, dataset_dir: str, split: str = "train", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "paco_lvis") -> None:
        annotation_file = os.path.join(dataset_dir, "vlpart", "paco", "annotations", f"paco_lvis_v1_{split}.json")
        coco_root = os.path.join(dataset_dir, "coco")
        super().__init__(annotation_file, functools.partial(os.path.join, coco_root), part_phrasings,
                         mode, seed, num_questions_per_image, name)


class PascalPartDataset(CocoCategoryDataset):
    """PASCAL-Part (VLPart's conversion): ``vlpart/pascal_part/<split>.json`` with VOC2010 images
    in ``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/``. Categories ``object:part``."""

    def __init__(self, dataset_dir: str, split: str = "train", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "pascal_part") -> None:
        root = os.path.join(dataset_dir, "vlpart", "pascal_part")
        image_dir = os.path.join(root, "VOCdevkit", "VOC2010", "JPEGImages")
        super().__init__(os.path.join(root, f"{split}.json"), functools.partial(os.path.join, image_dir),
                         part_phrasings, mode, seed, num_questions_per_image, name)


class CocoInstancesDataset(TargetDataset):
    """Users' own data: any COCO instances file plus its image folder.

    If some annotations carry a text field (:data:`TEXT_FIELDS`) the file is referring data:
    one target per such annotation, its texts as requests (``is_sentence`` chooses the long
    question templates). Otherwise one request per category present (the category name).
    """

    def __init__(self, annotation_file: str, image_dir: str, mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, is_sentence: bool = False, name: str = "coco") -> None:
        index = CocoIndex.from_file(annotation_file)
        targets = expression_targets(index)
        self.uses_expressions = bool(targets)
        if not targets:
            targets = category_targets(index, plain_phrasing)
        self.target_id_key = "ann_ids" if self.uses_expressions else "category_ids"
        super().__init__(
            targets, _image_records(index, functools.partial(os.path.join, image_dir)), _annotations(index),
            mode, seed, num_questions_per_image, name,
            is_sentence=is_sentence and self.uses_expressions, one_text_per_target=not self.uses_expressions,
        )
        logger.info("%s (%s): %d images, %d items, %s requests", name, mode, len(self.image_ids), len(self),
                    "expression" if self.uses_expressions else "category")
