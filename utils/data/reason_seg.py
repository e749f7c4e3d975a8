"""ReasonSeg: labelme-style polygon JSON next to each image, with reasoning queries.

On disk (``<dataset_dir>/reason_seg/ReasonSeg/``)::

    train/NAME.jpg + train/NAME.json      # also val/, test/
    explanatory/train.json                # [{"image": NAME.jpg, "query": ..., "outputs": ...}]

A JSON holds ``text`` (1-5 queries, all about the same target), ``is_sentence`` (long query or
short phrase) and ``shapes`` (``{"label": "target"|"ignore"|"flag", "points": [[x, y], ...]}``).
An optional ``target_names`` (one per query of ``text``) says what a ``"named"`` answer to that
query calls the target: a short phrase that needs no looking ("the red shape" for "Which shape
has the colour of a ripe tomato?"). The real ReasonSeg files have none (the synthetic ones do).
Labelme's ``imageHeight`` and ``imageWidth``, when given, say whether the polygons were drawn on the
EXIF-upright image or on the stored pixels (:meth:`ReasonSegDataset._turn_upright`).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from utils.data import templates
from utils.data.base import Mode, RawDataset, missing_path_error
from utils.data.io import load_image_rgb, read_json, read_json_lenient
from utils.data.rng import sample_without_replacement
from utils.data.sample import (
    IGNORE_LABEL,
    MALFORMED_ANNOTATION_ERRORS,
    CorruptSampleError,
    EmptySampleError,
    RawSample,
)

logger = logging.getLogger(__name__)

ValQueries = Literal["all", "first"]

ANSWER_KIND_MASK = "mask"
ANSWER_KIND_EXPLAINED = "mask+explanation"
ANSWER_KIND_TEXT = "text"


@dataclass(frozen=True)
class ReasonSegAnnotation:
    """The parsed content of one ReasonSeg JSON file."""

    mask: np.ndarray  # H x W uint8: 1 target, 255 ignore, 0 background
    queries: list[str]
    is_sentence: bool
    target_names: list[str | None] | None = None  # per query, when the file gives them

    def answer_name(self, query_index: int) -> str | None:
        """What a ``"named"`` answer to query ``query_index`` calls the target: the file's name
        for that query, else a short query itself; None (a plain answer) for a sentence without
        a name."""
        name = self.target_names[query_index] if self.target_names else None
        if name:
            return name
        return None if self.is_sentence else self.queries[query_index]


def _polygon(points: Any) -> np.ndarray:
    # Truncating float coordinates to int32 is the reference rasterisation (LISA's).
    return np.array([points], dtype=np.int32)


def rasterize_shapes(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Fill ReasonSeg polygons into one mask, exactly as the reference evaluation does.

    ``flag`` shapes are skipped; the others are filled largest area first, in the order of the
    reference's ``np.argsort(areas)[::-1]`` (so shapes of equal area go in reverse file order),
    each with its outline (1 px) and interior: ``ignore`` shapes with 255, all other shapes
    (``target``) with 1. A smaller shape drawn later overwrites a larger one.
    """
    drawable: list[tuple[int, np.ndarray, int]] = []
    for position, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise ValueError(f"shape {position} is {type(shape).__name__} {shape!r:.40}, not a dict")
        label = str(shape.get("label", "")).lower()
        if label == "flag":
            continue
        points = shape.get("points") or []
        if len(points) == 0:
            continue
        polygon = _polygon(points)
        value = IGNORE_LABEL if "ignore" in label else 1
        drawable.append((_drawn_area(polygon, height, width), polygon, value))
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in np.argsort([area for area, _, _ in drawable])[::-1]:
        _, polygon, value = drawable[index]
        cv2.polylines(mask, polygon, True, value, 1)
        cv2.fillPoly(mask, polygon, value)
    return mask


def _drawn_area(polygon: np.ndarray, height: int, width: int) -> int:
    """Pixels that outline plus fill of ``polygon`` set in an ``height x width`` image.

    The reference ranks shapes by drawing each on a full-size mask; ReasonSeg photographs reach
    4000 x 3000, so the same two calls draw into the polygon's bounding box clipped to the image
    instead. Every drawn pixel lies inside that box, and OpenCV clips lines and fills only at the
    image's borders, which the box shares where the polygon crosses them, so integer points
    translated by the box's corner set the same pixels, shifted.
    """
    if polygon.ndim != 3 or polygon.shape[2] != 2:
        # Not labelme's [[x, y], ...]: whatever OpenCV makes of it (or the error it raises) is
        # what the reference gets, so draw it as the reference does.
        full = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(full, polygon, True, 1, 1)
        cv2.fillPoly(full, polygon, 1)
        return int(full.sum())
    points = polygon.reshape(-1, 2)
    left, top = max(int(points[:, 0].min()), 0), max(int(points[:, 1].min()), 0)
    right, bottom = min(int(points[:, 0].max()), width - 1), min(int(points[:, 1].max()), height - 1)
    if left > right or top > bottom:
        return 0
    box = np.zeros((bottom - top + 1, right - left + 1), dtype=np.uint8)
    shifted = polygon - np.array([left, top], dtype=np.int32)
    cv2.polylines(box, shifted, True, 1, 1)
    cv2.fillPoly(box, shifted, 1)
    return int(box.sum())


def read_annotation(json_path: str, height: int, width: int) -> ReasonSegAnnotation:
    """Parse a ReasonSeg JSON (UTF-8 or cp1252) and rasterise its polygons.

    Raises:
        CorruptSampleError: unreadable file, missing keys or malformed values (the message names
            the file).
    """
    return parse_annotation(read_json_lenient(json_path), json_path, height, width)


def parse_annotation(content: Any, json_path: str, height: int, width: int) -> ReasonSegAnnotation:
    """:func:`read_annotation` of the already parsed ``content`` of ``json_path``."""
    try:
        queries = _queries(content)
        names = content.get("target_names")
        if names is not None and len(names) != len(queries):
            raise ValueError(f"{len(names)} target_names for {len(queries)} queries in 'text'")
        kept = [index for index, query in enumerate(queries) if query]
        return ReasonSegAnnotation(
            mask=rasterize_shapes(content.get("shapes", []), height, width),
            queries=[queries[index] for index in kept],
            is_sentence=bool(content["is_sentence"]),
            target_names=None if names is None else [str(names[index] or "").strip() or None for index in kept],
        )
    except (*MALFORMED_ANNOTATION_ERRORS, cv2.error) as error:
        raise CorruptSampleError(f"malformed ReasonSeg annotation {json_path}: {error!r}") from error


def recorded_size(content: Any, json_path: str) -> tuple[int, int] | None:
    """The ``(imageHeight, imageWidth)`` labelme recorded in ``content``, None without both.

    Raises:
        CorruptSampleError: a size that is not a number (the message names the file).
    """
    try:
        height, width = content.get("imageHeight"), content.get("imageWidth")
        if height is None or width is None:
            return None
        return int(height), int(width)
    except MALFORMED_ANNOTATION_ERRORS as error:
        raise CorruptSampleError(f"malformed ReasonSeg annotation {json_path}: {error!r}") from error


def _queries(content: Any) -> list[str]:
    """The stripped queries of a parsed ReasonSeg JSON (empty ones included)."""
    text = content["text"]
    if isinstance(text, str):  # one query written without its list: not one query per character
        text = [text]
    if not isinstance(text, list):
        raise ValueError(f"'text' must be a list of queries, got {type(text).__name__}")
    return [str(query).strip() for query in text]


def count_queries(json_path: str) -> int:
    """Number of non-empty queries in a ReasonSeg JSON (for indexing val items).

    Raises:
        CorruptSampleError: as :func:`read_annotation`, for the file or its ``text``.
    """
    content = read_json_lenient(json_path)
    try:
        return sum(1 for query in _queries(content) if query)
    except MALFORMED_ANNOTATION_ERRORS as error:
        raise CorruptSampleError(f"malformed ReasonSeg annotation {json_path}: {error!r}") from error


class ReasonSegDataset(RawDataset):
    """ReasonSeg images with their queries and polygon masks.

    Items:
        * train: one per image. Up to ``num_questions_per_image`` of its queries are asked (all
          about the same target, so every turn gets the same mask); each turn is a question on
          its own (training asks them as one conversation or, with ``--conversation_mode
          single_turn``, each as its own). For images listed in the
          explanatory file, the whole sample is, with probability ``text_only_rate``, a
          text-only one (the query asked as is, or "What is X in this image?" for a short
          phrase, answered by the explanation: no ``[SEG]``, no mask), or
          with probability ``explanatory_rate`` a "mask + explanation" one (explanatory question,
          answer ``"Sure, [SEG]. <explanation>"``), otherwise plain. LISA's ``--explanatory 0.1``
          equals ``text_only_rate=0.1, explanatory_rate=0.45``.
        * val: one per image with ``val_queries="first"`` (the default): its first query, LISA's
          protocol, scored by test.py and training validation alike; ``val_queries="all"``: one per
          (image, query), so that every query is scored (``--reason_seg_queries all``).

    In the ``"named"`` answer style, mask and explanatory answers name the target
    (:meth:`ReasonSegAnnotation.answer_name`: the file's name for the query, else a short query
    itself; a sentence without a name keeps the plain answer).

    A file whose shapes fill no target pixel is refused in training (:class:`EmptySampleError`,
    replaced by the sampler) and kept in validation (scored against its empty mask, one warning).

    Meta: ``is_sentence`` (bool), ``query_indices`` (list[int]), ``answer_kind`` (``"mask"``,
    ``"mask+explanation"`` or ``"text"``), ``no_target`` (list[bool], all False).
    """

    name = "reason_seg"

    def __init__(
        self,
        dataset_dir: str,
        split: str = "train",
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        explanatory_rate: float = 0.45,
        text_only_rate: float = 0.1,
        val_queries: ValQueries = "first",
        folder: str = "ReasonSeg",
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        super().__init__(mode, seed, num_questions_per_image, name, answer_style)
        if not (0 <= explanatory_rate and 0 <= text_only_rate and explanatory_rate + text_only_rate <= 1):
            raise ValueError(
                f"need 0 <= explanatory_rate, text_only_rate and their sum <= 1, got "
                f"{explanatory_rate}, {text_only_rate}"
            )
        if val_queries not in ("all", "first"):
            raise ValueError(f"val_queries must be 'all' or 'first', got {val_queries!r}")
        self.root = os.path.join(dataset_dir, "reason_seg", folder)
        self.split = split
        self.explanatory_rate = explanatory_rate
        self.text_only_rate = text_only_rate
        self.image_paths = self._index_images(split)
        self.explanations: dict[str, str] = {}
        self._warned_no_target: set[str] = set()
        self._warned_sizes: set[str] = set()
        if self.is_train and (explanatory_rate > 0 or text_only_rate > 0):
            self.explanations = self._read_explanations()
        # val items: (image index, query index)
        self.val_items: list[tuple[int, int]] = []
        if not self.is_train:
            for image_index, image_path in enumerate(self.image_paths):
                try:
                    count = count_queries(_json_path(image_path))
                except CorruptSampleError as error:
                    # One item whose sample cannot be read: evaluation counts it as unreadable.
                    logger.warning("%s: %s (counted as one unreadable item)", self.name, error)
                    count = 1
                if count == 0:
                    logger.warning("%s: %s has no query; left out", self.name, _json_path(image_path))
                count = min(count, 1) if val_queries == "first" else count
                self.val_items.extend((image_index, query) for query in range(count))
        logger.info("%s %s (%s): %d images, %d items", self.name, split, mode, len(self.image_paths), len(self))

    def _index_images(self, split: str) -> list[str]:
        paths: list[str] = []
        for part in split.split("_"):  # "train_val" = train + val (LISA's spelling)
            folder = os.path.join(self.root, part)
            if not os.path.isdir(folder):
                raise missing_path_error(f"ReasonSeg split {part!r}", folder, self.root)
            images = sorted(glob.glob(os.path.join(folder, "*.jpg")))
            with_json = [path for path in images if os.path.isfile(_json_path(path))]
            if len(with_json) < len(images):
                logger.warning("%s: %d images without a JSON are left out", folder, len(images) - len(with_json))
            paths.extend(with_json)
        if not paths:
            raise FileNotFoundError(f"no ReasonSeg image with a JSON in {self.root} split {split!r}")
        return paths

    def _read_explanations(self) -> dict[str, str]:
        path = os.path.join(self.root, "explanatory", "train.json")
        if not os.path.isfile(path):
            logger.warning("%s not found: ReasonSeg samples get no explanatory answers", path)
            return {}
        return {item["image"]: str(item["outputs"]) for item in read_json(path)}

    def __len__(self) -> int:
        return len(self.image_paths) if self.is_train else len(self.val_items)

    def item_path(self, index: int) -> str | None:
        return self.image_paths[index if self.is_train else self.val_items[index][0]]

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        if self.is_train:
            image_index, query_indices = index, None
        else:
            image_index, query = self.val_items[index]
            query_indices = [query]
        image_path = self.image_paths[image_index]
        json_path = _json_path(image_path)
        content = read_json_lenient(json_path)
        image = load_image_rgb(
            image_path,
            choose_orientation=lambda stored, upright: self._turn_upright(json_path, content, stored, upright),
        )
        annotation = parse_annotation(content, json_path, *image.shape[:2])
        if not annotation.queries:
            raise EmptySampleError(f"ReasonSeg annotation {json_path} has no query")
        if not (annotation.mask == 1).any():
            self._no_target_pixel(json_path)
        if query_indices is None:
            query_indices = sample_without_replacement(
                rng, self.num_questions_per_image, len(annotation.queries)
            )
        elif query_indices[0] >= len(annotation.queries):
            raise CorruptSampleError(f"{json_path} changed since indexing")
        requests = [annotation.queries[i] for i in query_indices]
        answer_kind, explanation = self._answer_kind(os.path.basename(image_path), rng)
        turns, masks = [], []
        for query_index, request in zip(query_indices, requests):
            if answer_kind == ANSWER_KIND_TEXT:
                turns.append((templates.text_question(request, annotation.is_sentence), explanation))
                continue
            if answer_kind == ANSWER_KIND_EXPLAINED:
                turns.append(
                    (
                        templates.explanatory_question(request, annotation.is_sentence, rng),
                        templates.explanatory_answer(
                            explanation, rng, annotation.answer_name(query_index), self.answer_style
                        ),
                    )
                )
            else:
                question_rng = rng if self.is_train else None
                turns.append(
                    (
                        templates.segmentation_question(request, annotation.is_sentence, question_rng),
                        templates.mask_answer(1, annotation.answer_name(query_index), self.answer_style, question_rng),
                    )
                )
            masks.append(annotation.mask)
        return RawSample(
            image=image,
            image_path=image_path,
            dataset=self.name,
            turns=turns,
            masks=masks,
            requests=requests,
            meta={
                "is_sentence": annotation.is_sentence,
                "query_indices": query_indices,
                "answer_kind": answer_kind,
                "no_target": [False] * len(turns),
            },
        )

    def _turn_upright(
        self, json_path: str, content: Any, stored: tuple[int, int], upright: tuple[int, int]
    ) -> bool:
        """Whether to apply the image's EXIF orientation, judged by the size labelme recorded.

        Labelme annotates the image it displays, normally turned upright (as LISA's evaluation,
        through ``cv2.imread``, reads it). Older versions ignored the EXIF orientation and
        annotated the stored pixels: a sideways photograph's polygons then fit only those, and the
        recorded size is the stored one. A size that fits neither means the JSON belongs to
        another image (or a resized copy), whose polygons would be drawn in the wrong place:
        training refuses the sample (the sampler replaces and counts it); evaluation warns once
        and draws them on the upright image, as LISA's evaluation does, so that a split is scored
        on the same items as the published numbers.
        """
        recorded = recorded_size(content, json_path)
        if recorded is None or recorded == upright:
            return True
        if recorded == stored:
            if json_path not in self._warned_sizes:
                self._warned_sizes.add(json_path)
                logger.warning(
                    "%s: %s records the stored size %dx%d, not the EXIF-upright %dx%d (annotated "
                    "without the EXIF orientation): the image is read as stored",
                    self.name, json_path, *stored, *upright,
                )
            return False
        as_stored = "" if stored == upright else f" ({stored[0]}x{stored[1]} as stored)"
        message = (
            f"ReasonSeg annotation {json_path} records an image of {recorded[0]}x{recorded[1]} "
            f"(imageHeight x imageWidth), but the image is {upright[0]}x{upright[1]}{as_stored}"
        )
        if self.is_train:
            raise CorruptSampleError(message)
        if json_path not in self._warned_sizes:
            self._warned_sizes.add(json_path)
            logger.warning("%s: %s; its polygons are drawn on the upright image, as LISA's evaluation does",
                           self.name, message)
        return True

    def _no_target_pixel(self, json_path: str) -> None:
        """A file whose shapes fill no target pixel (only ignore/flag shapes, or none that
        rasterises). Training would teach "[SEG]" over an all-background mask: the sample is
        refused (the sampler replaces and counts it). Evaluation keeps the item, so the split
        is scored whole, with a warning once per file."""
        message = f"ReasonSeg annotation {json_path} has no target pixel"
        if self.is_train:
            raise EmptySampleError(message)
        if json_path not in self._warned_no_target:
            self._warned_no_target.add(json_path)
            logger.warning("%s: %s; scored against an empty mask", self.name, message)

    def _answer_kind(self, image_name: str, rng: np.random.Generator) -> tuple[str, str]:
        explanation = self.explanations.get(image_name) if self.is_train else None
        if explanation is None:
            return ANSWER_KIND_MASK, ""
        draw = rng.random()
        if draw < self.text_only_rate:
            return ANSWER_KIND_TEXT, explanation
        if draw < self.text_only_rate + self.explanatory_rate:
            return ANSWER_KIND_EXPLAINED, explanation
        return ANSWER_KIND_MASK, ""


def _json_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".json"
