"""Semantic segmentation from label-map PNGs: ADE20K, COCO-Stuff and Mapillary Vistas v2.0.

Each image has a label PNG whose values are mapped to class indices (or to "ignore"). A training
sample asks about up to ``num_questions_per_image`` classes present in the image, one turn per
class; each mask is 1 on the class, 255 on unlabelled pixels (they could be anything) and 0
elsewhere.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence

import numpy as np

from utils.data import templates
from utils.data.base import Mode, RawDataset, missing_path_error
from utils.data.class_names import ADE20K_CLASSES, COCO_STUFF_CLASSES, load_class_names
from utils.data.io import load_image_rgb, load_label_map, read_json
from utils.data.rng import sample_without_replacement
from utils.data.sample import IGNORE_LABEL, CorruptSampleError, EmptySampleError, RawSample

logger = logging.getLogger(__name__)

IGNORE_CLASS = -1
CLASS_DTYPE = np.int16
"""dtype of class maps: a quarter of int64's memory traffic on 12-megapixel Mapillary labels."""


def class_masks(class_map: np.ndarray, class_indices: Sequence[int]) -> list[np.ndarray]:
    """One uint8 mask per class: 1 on the class, 255 on ignored pixels, 0 elsewhere."""
    ignore = class_map == IGNORE_CLASS
    masks = []
    for class_index in class_indices:
        mask = (class_map == class_index).astype(np.uint8)
        mask[ignore] = IGNORE_LABEL
        masks.append(mask)
    return masks


def pair_images_with_labels(
    label_dir: str, image_dir: str, label_ext: str = ".png", image_ext: str = ".jpg"
) -> tuple[list[str], list[str]]:
    """Sorted (image, label) paths for every label file whose image exists."""
    if not os.path.isdir(label_dir):
        raise missing_path_error("label folder", label_dir, os.path.dirname(label_dir))
    if not os.path.isdir(image_dir):
        raise missing_path_error("image folder", image_dir, os.path.dirname(image_dir))
    image_names = set(os.listdir(image_dir))
    label_paths = sorted(glob.glob(os.path.join(label_dir, f"*{label_ext}")))
    images, labels = [], []
    for label_path in label_paths:
        image_name = os.path.splitext(os.path.basename(label_path))[0] + image_ext
        if image_name in image_names:
            images.append(os.path.join(image_dir, image_name))
            labels.append(label_path)
    missing = len(label_paths) - len(labels)
    if missing:
        logger.warning("%s: %d label maps have no image in %s", label_dir, missing, image_dir)
    if not labels:
        raise FileNotFoundError(f"no label map with an image: labels {label_dir}, images {image_dir}")
    return images, labels


class LabelMapDataset(RawDataset):
    """Images with label-map PNGs; the subclasses say where the files are and what values mean.

    Args:
        value_to_class: lookup table from label value to class index (``-1`` = ignore); values
            beyond its end are ignored.
        askable: per class, whether it may be asked about (others still count as background).
        palette: for RGB label maps, the colour of each class index (``N x 3``).

    Items: train: one per image, up to ``num_questions_per_image`` present classes drawn at
    random; val: one per image, every askable present class in index order (one turn each). A
    ``"named"`` answer names the class asked ("Sure, it is wall [SEG].").
    Meta: ``class_ids`` (list[int], one per turn), ``no_target`` (all False), ``is_sentence``.
    """

    def __init__(
        self,
        image_paths: list[str],
        label_paths: list[str],
        class_names: Sequence[str],
        value_to_class: np.ndarray,
        askable: Sequence[bool] | None = None,
        palette: np.ndarray | None = None,
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        super().__init__(mode, seed, num_questions_per_image, name, answer_style)
        if len(image_paths) != len(label_paths):
            raise ValueError("image_paths and label_paths differ in length")
        self.image_paths = image_paths
        self.label_paths = label_paths
        self.class_names = tuple(class_names)
        self.value_to_class = np.asarray(value_to_class, dtype=np.int64)
        if len(self.class_names) > np.iinfo(CLASS_DTYPE).max:
            raise ValueError(f"{len(self.class_names)} classes do not fit a {np.dtype(CLASS_DTYPE).name} class map")
        valid = (self.value_to_class == IGNORE_CLASS) | (
            (self.value_to_class >= 0) & (self.value_to_class < len(self.class_names))
        )
        if not valid.all():
            raise ValueError(
                f"value_to_class maps to {sorted(set(self.value_to_class[~valid].tolist()))}, neither a class "
                f"index below {len(self.class_names)} nor {IGNORE_CLASS} (ignore)"
            )
        self._lookup_tables: dict[np.dtype, np.ndarray] = {}
        self.askable = np.asarray([True] * len(self.class_names) if askable is None else askable, dtype=bool)
        self.palette = palette
        logger.info("%s (%s): %d images, %d classes", self.name, mode, len(self), len(self.class_names))

    def __len__(self) -> int:
        return len(self.image_paths)

    def classes_of(self, values: np.ndarray) -> np.ndarray:
        """Class index of each label value (``-1`` = ignore, also for values outside
        ``value_to_class``), as :data:`CLASS_DTYPE`. Meant for few values: tables and distinct
        values, not whole label maps."""
        values = np.asarray(values).astype(np.int64)
        inside = (values >= 0) & (values < len(self.value_to_class))
        classes = np.full(values.shape, IGNORE_CLASS, dtype=CLASS_DTYPE)
        classes[inside] = self.value_to_class[values[inside]]
        return classes

    def class_map(self, label: np.ndarray, label_path: str) -> np.ndarray:
        """Class index per pixel (``-1`` = ignore) from a raw label map, as :data:`CLASS_DTYPE`."""
        if label.ndim == 3:
            if self.palette is None:
                raise CorruptSampleError(f"{label_path}: RGB label map but no colour palette")
            colours, inverse = np.unique(_colour_keys(label).ravel(), return_inverse=True)
            classes = self.classes_of(_palette_indices(colours, self.palette))
            return classes[inverse].reshape(label.shape[:2])
        if label.dtype in (np.uint8, np.uint16):
            # One table entry per possible value: a single gather, no int64 copy of the map.
            table = self._lookup_tables.get(label.dtype)
            if table is None:
                table = self._lookup_tables[label.dtype] = self.classes_of(np.arange(np.iinfo(label.dtype).max + 1))
            return table[label]
        # Wider values (32-bit label maps): each distinct value is mapped once.
        values, inverse = np.unique(label.ravel(), return_inverse=True)
        return self.classes_of(values)[inverse].reshape(label.shape)

    def present_classes(self, class_map: np.ndarray) -> list[int]:
        """The askable classes of ``class_map``, in index order."""
        # A count per class (ignore shifted to bin 0) is linear; np.unique sorts every pixel.
        counts = np.bincount(class_map.ravel() + 1, minlength=len(self.class_names) + 1)[1:]
        return [int(c) for c in np.flatnonzero(counts) if self.askable[c]]

    def item_path(self, index: int) -> str | None:
        return f"{self.image_paths[index]} (label map {self.label_paths[index]})"

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = load_image_rgb(image_path, exif_orientation=False)  # as the label map
        class_map = self.class_map(load_label_map(label_path), label_path)
        if class_map.shape != image.shape[:2]:
            raise CorruptSampleError(
                f"{label_path}: label map {class_map.shape} vs image {image.shape[:2]} of {image_path}"
            )
        present = self.present_classes(class_map)
        if not present:
            raise EmptySampleError(f"{label_path}: no labelled class to ask about")
        if self.is_train:
            chosen = [present[i] for i in sample_without_replacement(rng, self.num_questions_per_image, len(present))]
            template_rng: np.random.Generator | None = rng
        else:
            chosen, template_rng = present, None
        requests = [self.class_names[c] for c in chosen]
        turns = [
            (
                templates.segmentation_question(request, False, template_rng),
                templates.mask_answer(1, request, self.answer_style, template_rng),
            )
            for request in requests
        ]
        return RawSample(
            image=image,
            image_path=image_path,
            dataset=self.name,
            turns=turns,
            masks=class_masks(class_map, chosen),
            requests=requests,
            meta={
                "class_ids": chosen,
                "label_path": label_path,
                "no_target": [False] * len(turns),
                "is_sentence": False,
            },
        )


def _colour_keys(colours: np.ndarray) -> np.ndarray:
    """One integer per RGB colour (``... x 3`` -> ``...``)."""
    colours = np.asarray(colours)
    return (
        (colours[..., 0].astype(np.int32) << 16) | (colours[..., 1].astype(np.int32) << 8) | colours[..., 2]
    )


def _palette_indices(keys: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette index of each colour key (``-1`` for colours not in the palette)."""
    lookup = {int(key): index for index, key in enumerate(_colour_keys(palette))}
    return np.array([lookup.get(int(key), IGNORE_CLASS) for key in keys], dtype=np.int64)


class Ade20kDataset(LabelMapDataset):
    """ADE20K SceneParsing: ``ade20k/images/<split>/*.jpg`` + ``ade20k/annotations/<split>/*.png``.

    Label 0 ("other") is ignored; labels 1..150 are classes 0..149 (:data:`ADE20K_CLASSES`, or
    ``ade20k/class_names.json``). ``split`` is ``training`` or ``validation``.
    """

    def __init__(self, dataset_dir: str, split: str = "training", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "ade20k", answer_style: str = "plain") -> None:
        root = os.path.join(dataset_dir, "ade20k")
        images, labels = pair_images_with_labels(
            os.path.join(root, "annotations", split), os.path.join(root, "images", split)
        )
        names = load_class_names(root, ADE20K_CLASSES)
        value_to_class = np.full(256, IGNORE_CLASS, dtype=np.int64)
        count = min(len(names), 255)
        value_to_class[1 : count + 1] = np.arange(count)
        super().__init__(
            images, labels, names, value_to_class, None, None, mode, seed, num_questions_per_image, name, answer_style
        )


class CocoStuffDataset(LabelMapDataset):
    """COCO-Stuff 164k: ``cocostuff/<split>/*.png`` label maps, images ``coco/<split>/*.jpg``.

    Label value ``v`` is class ``v`` (COCO id ``v + 1``, :data:`COCO_STUFF_CLASSES` or
    ``cocostuff/class_names.json``); 255 is unlabeled (ignored). Classes whose name has a hyphen
    ("wall-brick", "floor-other" ...) are never asked about, as in LISA (their names are not
    natural phrases); their pixels count as background for the other classes.
    """

    def __init__(self, dataset_dir: str, split: str = "train2017", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, name: str = "cocostuff", answer_style: str = "plain") -> None:
        label_root = os.path.join(dataset_dir, "cocostuff")
        images, labels = pair_images_with_labels(
            os.path.join(label_root, split), os.path.join(dataset_dir, "coco", split)
        )
        names = load_class_names(label_root, COCO_STUFF_CLASSES)
        value_to_class = np.full(256, IGNORE_CLASS, dtype=np.int64)
        count = min(len(names), 255)
        value_to_class[:count] = np.arange(count)
        askable = ["-" not in class_name for class_name in names]
        super().__init__(
            images, labels, names, value_to_class, askable, None, mode, seed, num_questions_per_image, name,
            answer_style,
        )


class MapillaryDataset(LabelMapDataset):
    """Mapillary Vistas v2.0: ``mapillary/config_v2.0.json`` (``labels[i]["readable"]`` names
    class ``i``), ``mapillary/<split>/v2.0/labels/*.png``, ``mapillary/<split>/images/*.jpg``.

    Palette label maps give the class index directly; RGB ones are mapped through the config's
    colours. The "Unlabeled" class is ignored. Names are lower-cased.
    """

    def __init__(self, dataset_dir: str, split: str = "training", mode: Mode = "train", seed: int = 0,
                 num_questions_per_image: int = 3, version: str = "v2.0", name: str = "mapillary",
                 answer_style: str = "plain") -> None:
        root = os.path.join(dataset_dir, "mapillary")
        config_path = os.path.join(root, f"config_{version}.json")
        if not os.path.isfile(config_path):
            raise missing_path_error("Mapillary config", config_path, root)
        labels_config = read_json(config_path)["labels"]
        names = [str(label["readable"]).lower() for label in labels_config]
        palette = np.array([label.get("color", [0, 0, 0]) for label in labels_config], dtype=np.int64)
        value_to_class = np.full(max(256, len(names)), IGNORE_CLASS, dtype=np.int64)
        value_to_class[: len(names)] = np.arange(len(names))
        for index, class_name in enumerate(names):
            if class_name == "unlabeled":
                value_to_class[index] = IGNORE_CLASS
        askable = [class_name != "unlabeled" for class_name in names]
        images, labels = pair_images_with_labels(
            os.path.join(root, split, version, "labels"), os.path.join(root, split, "images")
        )
        super().__init__(
            images, labels, names, value_to_class, askable, palette, mode, seed, num_questions_per_image, name,
            answer_style,
        )
