"""The record every raw dataset returns, and the errors raised while building one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.constants import IGNORE_LABEL, SEG_TOKEN  # noqa: F401  (re-exported for the loaders)


class CorruptSampleError(Exception):
    """An image or annotation file cannot be read or is inconsistent.

    The message always names the offending file, so a skipped sample can be traced.
    """


class EmptySampleError(CorruptSampleError):
    """The files are readable but yield nothing to ask about (e.g. a label map with no class)."""


MALFORMED_ANNOTATION_ERRORS: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError, AttributeError, IndexError)
"""What parsing a badly structured annotation raises (a missing key, a string where a dict or list
belongs, a list too short ...). Readers turn these into :class:`CorruptSampleError` naming the
file, the only error evaluation and training skip: anything else would end a whole run."""


@dataclass
class RawSample:
    """One image with one conversation about it, before any tokenisation.

    Attributes:
        image: ``H x W x 3`` uint8 RGB array, in the orientation its annotations were made on:
            ReasonSeg applies the EXIF orientation (labelme annotates the upright image); the
            semantic label maps, the COCO-based sources (refCOCO, gRefCOCO, PACO, PASCAL-Part,
            generic COCO files) and LLaVA's VQA keep the pixels as stored, which their masks,
            polygons and RLE index (see :func:`utils.data.io.load_image_rgb`).
        image_path: path of the source image file as found on disk.
        dataset: source name, e.g. ``"reason_seg"``, ``"refcoco"``, ``"ade20k"``.
        turns: ``(question, answer)`` pairs about this one image, in conversation order. Each
            answer contains one ``[SEG]`` per target mask; a text-only answer has none. Questions
            carry no image placeholder (the processor adds the image).
        masks: one ``H x W`` uint8 mask per ``[SEG]`` across all turns, in order; values 1
            (target), 0 (background), 255 (ignore).
        requests: the raw request of each turn (class name, referring expression or query).
        meta: everything else. Keys set by every loader: ``no_target`` (``list[bool]``, one per
            turn: the request names nothing in the image, the answer has no ``[SEG]``). See
            ``dataset/README.md`` for the other keys.
        dialogue: the turns form one dialogue (a turn may refer to earlier ones, as in VQA), so
            they are always asked as one conversation. False (every segmentation source): each
            turn is a question on its own, asked as its own single-turn conversation in evaluation
            and in training's ``single_turn`` mode (``--conversation_mode``).
    """

    image: np.ndarray
    image_path: str
    dataset: str
    turns: list[tuple[str, str]]
    masks: list[np.ndarray]
    requests: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    dialogue: bool = False

    @property
    def num_seg_tokens(self) -> int:
        """Number of ``[SEG]`` placeholders across all answers."""
        return sum(answer.count(SEG_TOKEN) for _, answer in self.turns)

    def masks_per_turn(self) -> list[list[np.ndarray]]:
        """Split ``masks`` by turn, following the ``[SEG]`` count of each answer."""
        grouped: list[list[np.ndarray]] = []
        start = 0
        for _, answer in self.turns:
            count = answer.count(SEG_TOKEN)
            grouped.append(self.masks[start : start + count])
            start += count
        return grouped

    def validate(self) -> None:
        """Check the invariants of the contract; raise ``CorruptSampleError`` if one fails."""
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise CorruptSampleError(
                f"{self.image_path}: image must be HxWx3 uint8, got {self.image.shape} {self.image.dtype}"
            )
        if len(self.requests) != len(self.turns):
            raise CorruptSampleError(
                f"{self.image_path}: {len(self.requests)} requests for {len(self.turns)} turns"
            )
        if self.num_seg_tokens != len(self.masks):
            raise CorruptSampleError(
                f"{self.image_path}: {self.num_seg_tokens} [SEG] tokens but {len(self.masks)} masks"
            )
        height, width = self.image.shape[:2]
        for mask in self.masks:
            if mask.shape != (height, width) or mask.dtype != np.uint8:
                raise CorruptSampleError(
                    f"{self.image_path}: mask {mask.shape} {mask.dtype} does not match image "
                    f"{(height, width)} uint8"
                )
