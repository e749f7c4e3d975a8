"""Shared logic of the annotation-based sources: targets (annotation sets) with their texts.

A :class:`Target` is what one request points at: a set of COCO-style annotations of one image
(their union is the mask) plus one or more texts that name it (referring sentences, or the
phrasings of a category name). Referring datasets, PACO-LVIS, PASCAL-Part and generic COCO
files all reduce to a list of targets.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.data import templates
from utils.data.base import Mode, RawDataset
from utils.data.coco_format import annotation_mask
from utils.data.io import load_image_rgb
from utils.data.sample import IGNORE_LABEL, CorruptSampleError, RawSample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One thing to segment: annotations of one image, and the texts that name it."""

    target_id: int
    image_id: int
    ann_ids: tuple[int, ...]  # empty: the texts name nothing in the image
    texts: tuple[str, ...]

    @property
    def no_target(self) -> bool:
        return not self.ann_ids


@dataclass(frozen=True)
class ImageRecord:
    """Where an image is and the size its annotations were made for."""

    path: str
    height: int
    width: int

    def load(self) -> np.ndarray:
        """The image as HxWx3 uint8 RGB, checked against the annotated size."""
        image = load_image_rgb(self.path, exif_orientation=False)  # COCO annotates the stored pixels
        height, width = image.shape[:2]
        if (height, width) != (self.height, self.width):
            raise CorruptSampleError(
                f"{self.path}: image is {height}x{width}, annotation says {self.height}x{self.width}"
            )
        return image


def union_mask(annotations: list[dict[str, Any]], height: int, width: int, where: str) -> np.ndarray:
    """Union of the annotations' segmentations: 1 target, 0 background.

    Crowd annotations (``iscrowd``) are ignore regions (255) unless they are all there is.

    Raises:
        CorruptSampleError: a segmentation cannot be decoded (names ``where``).
    """
    regular = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    crowd = [ann for ann in annotations if ann.get("iscrowd", 0)] if regular else []
    mask = np.zeros((height, width), dtype=np.uint8)
    for annotation in crowd:
        mask[annotation_mask(annotation, height, width, where) > 0] = IGNORE_LABEL
    for annotation in regular or annotations:
        mask[annotation_mask(annotation, height, width, where) > 0] = 1
    return mask


def instance_boxes(annotations: list[dict[str, Any]], height: int, width: int, where: str) -> list[list[int]]:
    """Tight box ``[x0, y0, x1, y1]`` (exclusive end, as :func:`utils.masks.mask_to_box`) of each
    non-crowd annotation's mask, in annotation order; an empty mask gives no box.

    Raises:
        CorruptSampleError: a segmentation cannot be decoded (names ``where``).
    """
    from utils.masks import mask_to_box

    boxes = []
    for annotation in annotations:
        if annotation.get("iscrowd", 0):
            continue
        box = mask_to_box(annotation_mask(annotation, height, width, where) > 0)
        if box is not None:
            boxes.append(list(box))
    return boxes


class TargetDataset(RawDataset):
    """Samples built from a list of :class:`Target`.

    Items:
        * train: one per image; up to ``num_questions_per_image`` requests, distinct targets
          first (one random text each), then further texts of the same targets. Random
          question/answer templates.
        * val: one per (target, text) pair, in order; canonical templates; every text is scored.

    With ``one_text_per_target`` the texts are paraphrases of one name (e.g. "the wheel of the
    car" / "car wheel"): train asks each target once with a random one, val uses the first.

    A mask answer in the ``"named"`` answer style names the request itself ("Sure, it is the
    man on the left [SEG]."). A no-target request gets a text answer without ``[SEG]``, no mask, ``meta["no_target"]``
    True for its turn and an all-zero ``H x W`` uint8 ground truth appended to
    ``meta["no_target_gt"]`` (one per no-target turn, in turn order), so an evaluator can score
    it against an empty mask.

    Meta: ``<target_id_key>`` (list[int], one per turn), ``no_target``, ``no_target_gt``,
    ``is_sentence``; in val mode also ``target_boxes`` (one list per turn: the box of each
    instance the request names, :func:`instance_boxes`; empty for a no-target turn), the
    targets of the detection metrics (a gRefCOCO expression naming three objects has one union
    mask but three target boxes).
    """

    target_id_key = "target_ids"

    def __init__(
        self,
        targets: list[Target],
        images: dict[int, ImageRecord],
        annotations: dict[int, dict[str, Any]],
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str | None = None,
        is_sentence: bool = False,
        one_text_per_target: bool = False,
        answer_style: str = "plain",
    ) -> None:
        super().__init__(mode, seed, num_questions_per_image, name, answer_style)
        self.is_sentence = is_sentence
        self.one_text_per_target = one_text_per_target
        self.set_targets(targets, images, annotations)

    def set_targets(
        self, targets: list[Target], images: dict[int, ImageRecord], annotations: dict[int, dict[str, Any]]
    ) -> None:
        """Install the targets and build the item index."""
        self.targets = [target for target in targets if target.texts]
        self.images = images
        self.annotations = annotations
        by_image: dict[int, list[int]] = defaultdict(list)
        for position, target in enumerate(self.targets):
            by_image[target.image_id].append(position)
        self.targets_by_image = dict(by_image)
        self.image_ids = sorted(self.targets_by_image)
        self.val_items = [
            (position, text)
            for position, target in enumerate(self.targets)
            for text in range(1 if self.one_text_per_target else len(target.texts))
        ]

    def __len__(self) -> int:
        return len(self.image_ids) if self.is_train else len(self.val_items)

    def _train_choices(self, image_id: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        positions = list(self.targets_by_image[image_id])
        rng.shuffle(positions)
        queues = {
            position: [int(i) for i in rng.permutation(len(self.targets[position].texts))] for position in positions
        }
        if self.one_text_per_target:
            queues = {position: queue[:1] for position, queue in queues.items()}
        choices: list[tuple[int, int]] = []
        while len(choices) < self.num_questions_per_image and any(queues.values()):
            for position in positions:
                if queues[position] and len(choices) < self.num_questions_per_image:
                    choices.append((position, queues[position].pop(0)))
        return choices

    def item_path(self, index: int) -> str | None:
        image_id = self.image_ids[index] if self.is_train else self.targets[self.val_items[index][0]].image_id
        return self.images[image_id].path

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        if self.is_train:
            image_id = self.image_ids[index]
            choices = self._train_choices(image_id, rng)
            template_rng: np.random.Generator | None = rng
        else:
            position, text = self.val_items[index]
            image_id = self.targets[position].image_id
            choices = [(position, text)]
            template_rng = None
        record = self.images[image_id]
        image = record.load()
        height, width = image.shape[:2]
        turns, masks, requests, no_target, no_target_gt, target_boxes = [], [], [], [], [], []
        for position, text in choices:
            target = self.targets[position]
            request = target.texts[text]
            question = templates.segmentation_question(request, self.is_sentence, template_rng)
            requests.append(request)
            no_target.append(target.no_target)
            if target.no_target:
                turns.append((question, templates.no_target_answer(template_rng)))
                no_target_gt.append(np.zeros((height, width), dtype=np.uint8))
                target_boxes.append([])
                continue
            turns.append((question, templates.mask_answer(1, request, self.answer_style, template_rng)))
            annotations = self._target_annotations(target, record.path)
            where = f"{record.path} target {target.target_id}"
            masks.append(union_mask(annotations, height, width, where))
            if not self.is_train:
                target_boxes.append(instance_boxes(annotations, height, width, where))
        return RawSample(
            image=image,
            image_path=record.path,
            dataset=self.name,
            turns=turns,
            masks=masks,
            requests=requests,
            meta={
                self.target_id_key: [self.targets[position].target_id for position, _ in choices],
                "no_target": no_target,
                "no_target_gt": no_target_gt,
                "is_sentence": self.is_sentence,
                **({} if self.is_train else {"target_boxes": target_boxes}),
            },
        )

    def _target_annotations(self, target: Target, image_path: str) -> list[dict[str, Any]]:
        """The annotations of ``target``, all of them: with one missing (a gRefCOCO expression
        naming three objects, one absent from instances.json) the union would be a partial mask
        scored or trained as the whole answer, so the sample is unreadable instead (evaluation
        counts it as such, training replaces it)."""
        missing = [ann_id for ann_id in target.ann_ids if ann_id not in self.annotations]
        if missing:
            raise CorruptSampleError(
                f"{image_path}: annotations {missing} of target {target.target_id} (of {list(target.ann_ids)}) "
                "are missing from the annotation file"
            )
        return [self.annotations[ann_id] for ann_id in target.ann_ids]
