"""Mask helpers shared by training validation, test.py, inference.py and the demo.

This module is the single place that turns masks into boxes, compares boxes,
encodes/decodes COCO RLE and draws masks on images.

Mask conventions (used by every function here that reads a mask)
----------------------------------------------------------------
A mask is a 2-D array ``[H, W]`` (numpy, or a torch tensor, which is converted
with ``.detach().cpu().numpy()``) of one of two kinds:

* **boolean** -- a prediction (or any binary mask): ``True`` = foreground.
* **integer** -- a ground truth label map: ``1`` = foreground, ``0`` =
  background, ``255`` = ignore. Ignore pixels are *never* foreground. Any other
  value raises ``ValueError`` (this catches e.g. a 0/2 label map; note that a
  0/255 "PNG style" mask is valid but is *all ignore*, i.e. empty -- convert it
  with ``mask > 0`` first).

Floating-point arrays (logits, probabilities) are rejected by the helpers in
this module: threshold them first (the project's convention is ``logits > 0``).

Box convention
--------------
Boxes are ``(x0, y0, x1, y1)`` tuples of Python ints in pixel coordinates,
**XYXY with exclusive upper corner**: ``x0``/``y0`` are the first foreground
column/row, ``x1 = last column + 1``, ``y1 = last row + 1``. So a box's width is
``x1 - x0``, its height ``y1 - y0``, its area ``(x1 - x0) * (y1 - y0)``, and
``mask[y0:y1, x0:x1]`` is the tight crop. An empty mask has the box ``None``.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from model.constants import IGNORE_LABEL

__all__ = [
    "Box",
    "IGNORE_LABEL",
    "DEFAULT_PALETTE",
    "to_numpy",
    "foreground",
    "mask_to_box",
    "box_area",
    "box_intersection_union",
    "box_iou",
    "box_to_xywh",
    "mask_score",
    "encode_rle",
    "decode_rle",
    "overlay_masks",
]

#: ``(x0, y0, x1, y1)``, exclusive upper corner (see module docstring).
Box = Tuple[int, int, int, int]


#: Distinct RGB colours used by :func:`overlay_masks` (cycled if there are more masks).
DEFAULT_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (0, 130, 200),    # blue
    (255, 225, 25),   # yellow
    (245, 130, 48),   # orange
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (250, 190, 212),  # pink
    (0, 128, 128),    # teal
    (170, 110, 40),   # brown
    (128, 0, 0),      # maroon
    (0, 0, 128),      # navy
    (128, 128, 0),    # olive
    (255, 255, 255),  # white
)


def to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a numpy array (torch tensors are detached and moved to CPU)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing torch
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_2d(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] mask, got shape {tuple(array.shape)}")


def _integer_label_parts(labels: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Split an integer label map into ``(foreground, ignore)`` boolean masks.

    Raises ``ValueError`` if a value other than 0, 1 and 255 is present.
    """
    fg = labels == 1
    ignore = labels == IGNORE_LABEL
    n_valid = np.count_nonzero(fg) + np.count_nonzero(ignore) + np.count_nonzero(labels == 0)
    if n_valid != labels.size:
        bad = np.unique(labels[(labels != 0) & ~fg & ~ignore])[:5]
        raise ValueError(
            f"{name} must contain only 0 (background), 1 (foreground) and {IGNORE_LABEL} "
            f"(ignore); found other values such as {bad.tolist()}"
        )
    return fg, ignore


def foreground(mask: Any, name: str = "mask") -> np.ndarray:
    """Boolean foreground of a mask under the module's convention.

    Boolean masks are returned as is; integer masks give ``mask == 1`` (255 = ignore
    is *not* foreground; values other than 0/1/255 raise ``ValueError``); floating
    masks raise ``TypeError`` (threshold them first).
    """
    arr = to_numpy(mask)
    _check_2d(arr, name)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return _integer_label_parts(arr, name)[0]
    raise TypeError(
        f"{name} has dtype {arr.dtype}; expected bool or an integer label map "
        f"(1 = foreground, 0 = background, {IGNORE_LABEL} = ignore). Threshold logits first "
        "(logits > 0)."
    )


def mask_to_box(mask: Any) -> Optional[Box]:
    """Tight box ``(x0, y0, x1, y1)`` (exclusive ``x1``/``y1``) of a mask's foreground.

    ``mask`` is a boolean ``[H, W]`` mask, or an integer ground truth where 1 is
    foreground and 255 (ignore) is *not* counted. Returns ``None`` for an empty mask.
    """
    fg = foreground(mask)
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def box_area(box: Optional[Sequence[int]]) -> int:
    """Area of a box (0 for ``None`` or a degenerate box with ``x1 <= x0`` or ``y1 <= y0``)."""
    if box is None:
        return 0
    x0, y0, x1, y1 = box
    return max(0, x1 - x0) * max(0, y1 - y0)


def box_intersection_union(
    a: Optional[Sequence[int]], b: Optional[Sequence[int]]
) -> Tuple[int, int]:
    """Intersection and union areas (in pixels) of two boxes; ``None`` has area 0."""
    area_a, area_b = box_area(a), box_area(b)
    if a is None or b is None:
        return 0, area_a + area_b
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, iw) * max(0, ih)
    return inter, area_a + area_b - inter


def box_iou(a: Optional[Sequence[int]], b: Optional[Sequence[int]]) -> float:
    """IoU of two boxes in the ``(x0, y0, x1, y1)`` exclusive convention.

    ``None`` stands for the box of an empty mask:

    * both ``None`` -> ``1.0`` (an empty prediction for an empty target is right);
    * exactly one ``None`` -> ``0.0``.

    Degenerate boxes have area 0; two boxes whose union is 0 give ``0.0``.
    """
    if a is None and b is None:
        return 1.0
    inter, union = box_intersection_union(a, b)
    if union <= 0:
        return 0.0
    return inter / union


def box_to_xywh(box: Sequence[int]) -> list:
    """COCO's ``[x, y, width, height]`` of an ``(x0, y0, x1, y1)`` box (exclusive corner), so
    ``width = x1 - x0``: the same box pycocotools' ``toBbox`` gives for the mask."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def mask_score(logits: Any) -> Optional[float]:
    """Confidence of one predicted mask: the mean sigmoid probability over the mask's own pixels.

    ``logits`` is the ``[H, W]`` mask logits (numpy or torch); the mask is ``logits > 0`` (the
    project's convention), so the score lies in ``(0.5, 1]``: near 0.5 when the decoder is
    unsure about every pixel it kept, near 1 when it is sure. ``None`` for an empty mask.
    """
    if hasattr(logits, "detach"):  # torch, computed where the tensor lives
        x = logits.detach().float()
        inside = x > 0
        if not bool(inside.any()):
            return None
        return float(x[inside].sigmoid().double().mean())
    x = np.asarray(logits, dtype=np.float64)
    inside = x > 0
    if not inside.any():
        return None
    return float(np.mean(1.0 / (1.0 + np.exp(-x[inside]))))


def encode_rle(mask: Any) -> dict:
    """Encode a binary mask as COCO RLE: ``{"size": [H, W], "counts": str}``.

    ``mask`` is boolean, or integer with values 0/1 only (a ground truth with
    255 ignore pixels cannot be represented and raises ``ValueError``). The
    ``counts`` string is the compressed COCO format decoded to ASCII, so the
    result is JSON-serialisable and accepted by pycocotools (and :func:`decode_rle`).
    """
    from pycocotools import mask as mask_util

    arr = to_numpy(mask)
    _check_2d(arr, "mask")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"encode_rle needs a bool or 0/1 integer mask, got dtype {arr.dtype}")
        if np.count_nonzero(arr == 0) + np.count_nonzero(arr == 1) != arr.size:
            raise ValueError("encode_rle needs a binary mask: integer masks may hold only 0 and 1")
    fortran = np.asfortranarray(arr, dtype=np.uint8)
    rle = mask_util.encode(fortran)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` counts, or uncompressed list counts).

    Returns a boolean ``[H, W]`` array.
    """
    from pycocotools import mask as mask_util

    if "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE is a mapping with 'size' ([H, W]) and 'counts'")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (list, tuple)):
        compressed = mask_util.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    elif isinstance(counts, str):
        compressed = {"size": [h, w], "counts": counts.encode("ascii")}
    elif isinstance(counts, bytes):
        compressed = {"size": [h, w], "counts": counts}
    else:
        raise TypeError(f"RLE counts must be str, bytes or a list of ints, got {type(counts)}")
    with warnings.catch_warnings():
        # pycocotools' Cython RLE object trips numpy 2's __array__(copy=...) deprecation.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_util.decode(compressed)
    return decoded.astype(bool)


def overlay_masks(
    image_rgb: Any,
    masks: Sequence[Any],
    alpha: float = 0.5,
    colors: Optional[Sequence[Sequence[int]]] = None,
    boxes: Union[None, bool, Sequence[Optional[Sequence[int]]]] = None,
    labels: Optional[Sequence[Optional[str]]] = None,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """Draw masks (and their boxes) on an RGB image; returns a new ``uint8 [H, W, 3]`` array.

    Args:
        image_rgb: ``uint8 [H, W, 3]`` RGB image (not modified).
        masks: masks of shape ``[H, W]`` (see the module's mask convention:
            boolean, or integer with 1 = foreground). Each is blended in its own
            colour: ``out = (1 - alpha) * image + alpha * colour`` on its pixels.
            Later masks are drawn over earlier ones.
        alpha: opacity of the mask colour, in ``[0, 1]``.
        colors: RGB colours, one per mask (cycled if shorter); default
            :data:`DEFAULT_PALETTE`.
        boxes: ``None`` (default) draws each mask's tight box (nothing for an
            empty mask); ``False`` draws no boxes; a sequence gives one box (or
            ``None``) per mask in the ``(x0, y0, x1, y1)`` exclusive convention,
            e.g. boxes predicted separately.
        labels: optional text per mask, written at its box's top-left corner.
        thickness: box line width in pixels (default scales with image size).
    """
    import cv2

    image = to_numpy(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image_rgb must be uint8 [H, W, 3], got dtype {image.dtype} shape {tuple(image.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = image.shape[:2]
    palette = [tuple(int(c) for c in col) for col in (colors or DEFAULT_PALETTE)]
    if not palette:
        raise ValueError("colors must not be empty")
    if isinstance(boxes, bool):
        if boxes:
            raise ValueError("boxes=True is not meaningful; use None (derive from masks) or False")
        box_list: Optional[list] = None
    elif boxes is None:
        box_list = []
    else:
        box_list = list(boxes)
        if len(box_list) != len(masks):
            raise ValueError(f"got {len(box_list)} boxes for {len(masks)} masks")
    if labels is not None and len(labels) != len(masks):
        raise ValueError(f"got {len(labels)} labels for {len(masks)} masks")
    if thickness is None:
        thickness = max(1, round(min(h, w) / 300))

    result = np.array(image, dtype=np.uint8, order="C", copy=True)
    fgs = []
    for i, mask in enumerate(masks):
        fg = foreground(mask, name=f"masks[{i}]")
        if fg.shape != (h, w):
            raise ValueError(f"masks[{i}] has shape {tuple(fg.shape)}, image is {(h, w)}")
        fgs.append(fg)
        color = np.array(palette[i % len(palette)], dtype=np.float32)
        blended = (1.0 - alpha) * result[fg].astype(np.float32) + alpha * color
        result[fg] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    for i, fg in enumerate(fgs):
        color = palette[i % len(palette)]
        if box_list is None:
            box = None
        elif boxes is None:
            box = mask_to_box(fg)
        else:
            box = box_list[i]
        if box is not None and box_area(box) > 0:
            x0, y0, x1, y1 = (int(v) for v in box)
            # cv2.rectangle takes inclusive corners.
            cv2.rectangle(result, (x0, y0), (x1 - 1, y1 - 1), color, thickness)
        if labels is not None and labels[i]:
            anchor = box if box is not None else mask_to_box(fg)
            if anchor is not None:
                org = (int(anchor[0]) + 2, max(int(anchor[1]) - 4, 12))
                cv2.putText(result, str(labels[i]), org, cv2.FONT_HERSHEY_SIMPLEX,
                            max(0.4, min(h, w) / 800), color, max(1, thickness // 2), cv2.LINE_AA)
    return result
