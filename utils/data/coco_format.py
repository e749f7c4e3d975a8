"""COCO-style annotation files: a light index and segmentation decoding (polygons and RLE)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from utils.data.io import read_json
from utils.data.sample import MALFORMED_ANNOTATION_ERRORS, CorruptSampleError

logger = logging.getLogger(__name__)


def _rle_objects(segmentation: Any, height: int, width: int) -> list[dict[str, Any]]:
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, list):
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    if segmentation and isinstance(segmentation[0], dict):  # RLE: one dict or a list of dicts
        rles = []
        for rle in segmentation:
            size = [int(value) for value in rle["size"]]
            # A size other than the image record's (an image resized or rotated after annotating)
            # would decode to a mask that does not fit the image.
            if size != [height, width]:
                raise ValueError(f"RLE size {size} is not the image's [{height}, {width}]")
            if isinstance(rle["counts"], list):  # uncompressed RLE
                rles.append(mask_utils.frPyObjects(rle, *rle["size"]))
            else:
                counts = rle["counts"]
                rles.append({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts})
        return rles
    polygons = [
        [float(value) for value in polygon]
        for polygon in segmentation
        if len(polygon) >= 6 and len(polygon) % 2 == 0
    ]
    return mask_utils.frPyObjects(polygons, height, width) if polygons else []


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, RLE dict or list of RLE dicts) to 0/1.

    Polygons with fewer than three points are dropped; an empty segmentation gives an empty mask.

    Raises:
        ValueError: the segmentation has an unknown structure, or an RLE's ``size`` is not
            ``[height, width]``.
    """
    rles = _rle_objects(segmentation, height, width)
    if not rles:
        return np.zeros((height, width), dtype=np.uint8)
    decoded = mask_utils.decode(rles)  # H x W x N
    if decoded.ndim == 2:
        decoded = decoded[:, :, None]
    return (decoded.max(axis=2) > 0).astype(np.uint8)


def annotation_mask(annotation: dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    """:func:`segmentation_to_mask` of one COCO annotation.

    Raises:
        CorruptSampleError: the segmentation is missing or malformed (names ``where`` and the
            annotation's id).
    """
    try:
        return segmentation_to_mask(annotation["segmentation"], height, width)
    except MALFORMED_ANNOTATION_ERRORS as error:
        raise CorruptSampleError(
            f"{where}: bad segmentation of annotation {annotation.get('id')}: {error!r}"
        ) from error


@dataclass
class CocoIndex:
    """Images, annotations per image and categories of one COCO-style ``instances`` file."""

    images: dict[int, dict[str, Any]]
    categories: dict[int, dict[str, Any]]
    annotations_by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str) -> "CocoIndex":
        """Read and index ``path`` (``FileNotFoundError`` naming it when absent)."""
        return cls.from_dict(read_json(path))

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> "CocoIndex":
        """Index an already parsed COCO dictionary."""
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in content.get("annotations", []):
            by_image[annotation["image_id"]].append(annotation)
        return cls(
            images={image["id"]: image for image in content.get("images", [])},
            categories={category["id"]: category for category in content.get("categories", [])},
            annotations_by_image=dict(by_image),
        )

    def image_ids_with_annotations(self) -> list[int]:
        """Sorted ids of the images that have at least one annotation."""
        return sorted(image_id for image_id in self.annotations_by_image if image_id in self.images)
