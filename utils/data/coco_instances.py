"""Sources in COCO instances format: PACO-LVIS, PASCAL-Part and users' own COCO files.

Each (image, category) pair is one target whose mask is the union of the category's instances
in the image (semantic style: "the wheel of the car" means all of them). A generic COCO file
whose annotations carry a text field (``sentences``, ``sentence``, ``caption``, ``expression``,
``referring_expression``) is read as referring data instead: one target per annotation.

For evaluation, :class:`CocoDetectionDataset` reads a COCO file instance by instance (one
``[SEG]`` per instance) so that the answers can be scored as detections (COCO AP).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from utils.data import templates
from utils.data.base import Mode, RawDataset
from utils.data.coco_format import CocoIndex, annotation_mask
from utils.data.sample import IGNORE_LABEL, RawSample
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
        answer_style: str = "plain",
    ) -> None:
        index = CocoIndex.from_file(annotation_file)
        super().__init__(
            category_targets(index, phrasings), _image_records(index, image_path), _annotations(index),
            mode, seed, num_questions_per_image, name, is_sentence=False, one_text_per_target=True,
            answer_style=answer_style,
        )
        logger.info("%s (%s): %d images, %d items from %s", name, mode, len(self.image_ids), len(self), annotation_file)


class PacoLvisDataset(CocoCategoryDataset):
    """PACO-LVIS: ``vlpart/paco/annotations/paco_lvis_v1_<split>.json``, images under ``coco/``
    (``file_name`` is ``train2017/...``). Categories ``object`` or ``object:part``."""

    def __init__(self, dataset_dir: str, split: str = "train", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "paco_lvis", answer_style: str = "plain") -> None:
        annotation_file = os.path.join(dataset_dir, "vlpart", "paco", "annotations", f"paco_lvis_v1_{split}.json")
        coco_root = os.path.join(dataset_dir, "coco")
        super().__init__(annotation_file, functools.partial(os.path.join, coco_root), part_phrasings,
                         mode, seed, num_questions_per_image, name, answer_style)


class PascalPartDataset(CocoCategoryDataset):
    """PASCAL-Part (VLPart's conversion): ``vlpart/pascal_part/<split>.json`` with VOC2010 images
    in ``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/``. Categories ``object:part``."""

    def __init__(self, dataset_dir: str, split: str = "train", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "pascal_part", answer_style: str = "plain") -> None:
        root = os.path.join(dataset_dir, "vlpart", "pascal_part")
        image_dir = os.path.join(root, "VOCdevkit", "VOC2010", "JPEGImages")
        super().__init__(os.path.join(root, f"{split}.json"), functools.partial(os.path.join, image_dir),
                         part_phrasings, mode, seed, num_questions_per_image, name, answer_style)


class CocoInstancesDataset(TargetDataset):
    """Users' own data: any COCO instances file plus its image folder.

    If some annotations carry a text field (:data:`TEXT_FIELDS`) the file is referring data:
    one target per such annotation, its texts as requests (``is_sentence`` chooses the long
    question templates). Otherwise one request per category present (the category name).
    """

    def __init__(self, annotation_file: str, image_dir: str, mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, is_sentence: bool = False, name: str = "coco",
                 answer_style: str = "plain") -> None:
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
            answer_style=answer_style,
        )
        logger.info("%s (%s): %d images, %d items, %s requests", name, mode, len(self.image_ids), len(self),
                    "expression" if self.uses_expressions else "category")


class CocoDetectionDataset(RawDataset):
    """A COCO instances file read for detection scoring (evaluation only): one item per
    (image, category).

    Every image of the file is asked about every category of the file (COCO's protocol: a
    detector answers for every category of every image, so a mask given for an absent category
    is a false positive), or with ``present_only`` only about the categories the image contains
    (cheaper; false positives on absent categories are then never asked for). The question is
    "Please segment all the {category} in this image."; the reference answer has one ``[SEG]``
    per non-crowd instance (annotation id order), whose mask is that instance (1) with the
    category's crowd regions as ignore (255); the ``"named"`` answer style names the category
    ("Sure, they are car [SEG] and [SEG]."). A category with no instance in the image is a
    no-target item (text answer, all-zero ground truth, crowd regions 255).

    Items are in image order, then category id order (:meth:`image_items` maps an image id to
    its items). Meta: ``coco_image_id``, ``coco_category_id``, ``category_ids`` (one per turn),
    ``no_target``, ``no_target_gt``, ``is_sentence`` (False).
    """

    def __init__(
        self,
        annotation_file: str,
        image_dir: str,
        mode: Mode = "val",
        seed: int = 0,
        num_questions_per_image: int = 1,
        present_only: bool = False,
        name: str = "coco",
        answer_style: str = "plain",
    ) -> None:
        if mode != "val":
            raise ValueError("CocoDetectionDataset is for evaluation (mode 'val'); train on COCO files with --coco_data")
        super().__init__(mode, seed, num_questions_per_image, name, answer_style)
        index = CocoIndex.from_file(annotation_file)
        if not index.categories:
            raise ValueError(f"{annotation_file} has no categories: a detection split asks about each category by name")
        self.annotation_file = annotation_file
        self.present_only = present_only
        self.images = _image_records(index, functools.partial(os.path.join, image_dir))
        self.categories = {cid: _clean(str(cat.get("name", cid))) for cid, cat in sorted(index.categories.items())}
        self.annotations_by_image = index.annotations_by_image
        self.items: list[tuple[int, int]] = []
        for image_id in sorted(self.images):
            present = {ann["category_id"] for ann in self.annotations_by_image.get(image_id, [])}
            self.items.extend(
                (image_id, cid) for cid in self.categories if not present_only or cid in present
            )
        logger.info("%s (detection): %d images x %s categories = %d items from %s", name, len(self.images),
                    "present" if present_only else len(self.categories), len(self.items), annotation_file)

    def __len__(self) -> int:
        return len(self.items)

    def image_items(self) -> dict[int, list[int]]:
        """Image id -> the indices of its items."""
        out: dict[int, list[int]] = defaultdict(list)
        for position, (image_id, _) in enumerate(self.items):
            out[image_id].append(position)
        return dict(out)

    def item_path(self, index: int) -> str | None:
        return self.images[self.items[index][0]].path

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        image_id, category_id = self.items[index]
        record = self.images[image_id]
        image = record.load()
        height, width = image.shape[:2]
        annotations = sorted(
            (ann for ann in self.annotations_by_image.get(image_id, []) if ann["category_id"] == category_id),
            key=lambda ann: ann["id"],
        )
        where = f"{record.path} category {category_id}"
        crowd = np.zeros((height, width), dtype=bool)
        for ann in annotations:
            if ann.get("iscrowd", 0):
                crowd |= annotation_mask(ann, height, width, where) > 0
        masks = []
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            instance = annotation_mask(ann, height, width, where)
            if not instance.any():
                logger.debug("%s: annotation %s has an empty segmentation, not a target", where, ann["id"])
                continue
            instance[crowd & (instance == 0)] = IGNORE_LABEL
            masks.append(instance)
        category = self.categories[category_id]
        question = templates.all_instances_question(category)
        no_target_gt = []
        if masks:
            answer = templates.mask_answer(len(masks), category, self.answer_style)
        else:
            answer = templates.no_target_answer()
            no_target_gt.append(np.where(crowd, IGNORE_LABEL, 0).astype(np.uint8))
        return RawSample(
            image=image,
            image_path=record.path,
            dataset=self.name,
            turns=[(question, answer)],
            masks=masks,
            requests=[category],
            meta={
                "coco_image_id": int(image_id),
                "coco_category_id": int(category_id),
                "category_ids": [int(category_id)],
                "no_target": [not masks],
                "no_target_gt": no_target_gt,
                "is_sentence": False,
            },
        )
