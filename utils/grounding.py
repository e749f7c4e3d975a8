"""Boxes as answers: the JSON of one answer, the label of each ``[SEG]``, COCO results records.

One answer as JSON (``inference.py --format json``, the batch lines, the Gradio download,
:meth:`utils.inference.Answer.record`)::

    {
      "prompt": "Where is the dog?",
      "text": "It is the dog [SEG].",
      "objects": [                       # one per [SEG], in the order of the answer
        {
          "bbox_2d": [x1, y1, x2, y2],   # absolute pixels of the original (upright) image,
                                         # Qwen2.5-VL's grounding convention; x2 = last column + 1
                                         # (so width = x2 - x1, as COCO); null for an empty mask
          "label": "the dog",            # the phrase the answer gives for this [SEG] or null
          "score": 0.91,                 # mean mask probability inside the mask; null if empty
          "area": 12345,                 # mask pixels
          "mask": {"size": [H, W], "counts": "..."}   # COCO RLE (pycocotools), H x W = height x width
        }
      ],
      "width": 800, "height": 534,       # the original image
      "image_tokens": 551,               # image tokens the image became for the language model
      "downscaled_to": null              # {"width", "height"} the model saw, when --max_image_side
    }                                    # downscaled it (masks and boxes are mapped back)

``bbox_2d`` is always the tight box of ``mask``. The label rule is :func:`seg_labels`; the score is
:func:`utils.masks.mask_score`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from model.constants import SEG_TOKEN
from utils.masks import box_to_xywh, encode_rle, mask_to_box

_PARENTHESIS_AFTER = re.compile(r"\s*\(([^()]*)\)")
_BOUNDARIES = ".,;:!?\n()"
_COPULAS = frozenset({"is", "are", "was", "were", "it's", "that's", "here's", "there's"})
_CONJUNCTIONS = frozenset({"and", "or"})
_STRIP = " \t\"'`*"


def _clean(phrase: str) -> str | None:
    phrase = " ".join(phrase.split()).strip(_STRIP)
    return phrase or None


def _last_chunk(text: str) -> tuple[str, str | None, str]:
    """(text after the last boundary, that boundary or None, text before it)."""
    for position in range(len(text) - 1, -1, -1):
        if text[position] in _BOUNDARIES:
            return text[position + 1 :], text[position], text[:position]
    return text, None, ""


def _phrase_before(text: str) -> str | None:
    chunk, boundary, rest = _last_chunk(text)
    if not chunk.strip() and boundary == ":":  # "the red car: [SEG]"
        chunk, _, _ = _last_chunk(rest)
    words = chunk.split()
    for index in range(len(words) - 1, -1, -1):  # "here is the red car" -> "the red car"
        if words[index].lower() in _COPULAS:
            words = words[index + 1 :]
            break
    while words and words[0].lower() in _CONJUNCTIONS:
        words = words[1:]
    return _clean(" ".join(words))


def seg_labels(text: str) -> list[str | None]:
    """The label of each ``[SEG]`` of an answer, in order (``None`` where it gives none).

    The rule:

    1. a parenthesised phrase right after the ``[SEG]`` (``"[SEG] (red car)"``) is its label;
    2. else the words right before it, back to the start of the answer, the previous ``[SEG]``
       (and its parenthesis) or a punctuation mark (``. , ; : ! ? ( )`` or a line break):
       ``"the red car [SEG]"``; for ``"the red car: [SEG]"`` the words before the colon;
       only what follows the last "is / are / was / were / it's / that's / here's / there's"
       is kept (``"Here is the red car [SEG]"`` -> ``"the red car"``, ``"It is [SEG]"`` -> none),
       and a leading "and" / "or" is dropped (``"[SEG] and [SEG]"`` -> none, none);
    3. whitespace is collapsed and quotes / asterisks around the phrase removed; an empty
       phrase is ``None``.
    """
    parts = text.split(SEG_TOKEN)
    labels: list[str | None] = []
    for index in range(len(parts) - 1):
        after = _PARENTHESIS_AFTER.match(parts[index + 1])
        if after:
            labels.append(_clean(after.group(1)))
            continue
        before = parts[index]
        own = _PARENTHESIS_AFTER.match(before) if index > 0 else None
        if own:  # the previous [SEG]'s parenthesis is not part of this phrase
            before = before[own.end() :]
        labels.append(_phrase_before(before))
    return labels


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A boolean mask brought to ``height`` x ``width`` (nearest neighbour)."""
    import cv2

    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def answer_objects(
    text: str,
    masks: Sequence[np.ndarray],
    scores: Sequence[float | None],
) -> list[dict[str, Any]]:
    """One object per ``[SEG]`` (see the module docstring): ``bbox_2d``, ``label``, ``score``,
    ``area``, ``mask``; the masks at the size the boxes are wanted in (the original image's: see
    ``utils.inference.Answer.masks``)."""
    labels = seg_labels(text)
    objects = []
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        box = mask_to_box(mask)
        score = scores[index] if index < len(scores) else None
        objects.append(
            {
                "bbox_2d": list(box) if box is not None else None,
                "label": labels[index] if index < len(labels) else None,
                "score": None if score is None or box is None else round(float(score), 6),
                "area": int(np.count_nonzero(mask)),
                "mask": encode_rle(mask),
            }
        )
    return objects


def coco_results(
    image_id: int, category_id: int, masks: Sequence[np.ndarray], scores: Sequence[float | None]
) -> list[dict[str, Any]]:
    """COCO results records (what ``COCO.loadRes`` reads) of one answer: per non-empty mask,
    ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` (the mask's tight box), ``score``
    and ``segmentation`` (COCO RLE). Empty masks are not detections, and neither is a mask
    without a score (``None``)."""
    records = []
    for mask, score in zip(masks, scores):
        mask = np.asarray(mask, dtype=bool)
        box = mask_to_box(mask)
        if box is None or score is None:
            continue
        records.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_id),
                "bbox": box_to_xywh(box),
                "score": float(score),
                "segmentation": encode_rle(mask),
            }
        )
    return records
