"""The common base of every per-source dataset: modes, seeding and the item protocol."""

from __future__ import annotations

import abc
import os
from typing import Literal

import numpy as np
import torch

from utils.data import templates
from utils.data.rng import derive_rng
from utils.data.sample import RawSample

Mode = Literal["train", "val"]
MODES: tuple[str, ...] = ("train", "val")


class RawDataset(torch.utils.data.Dataset, abc.ABC):
    """A map-style dataset of :class:`RawSample` read from one source.

    Subclasses index their files in ``__init__`` (cheaply: names and small annotations only)
    and build a sample in :meth:`get_sample`.

    * ``mode="train"``: item ``i`` is one image of the source; the questions asked about it
      (up to ``num_questions_per_image``) and the template wordings are drawn from ``rng``.
    * ``mode="val"``: each item is fixed (canonical templates, no randomness) and iterating
      ``range(len(self))`` visits every item of the split exactly once. What an item is (an
      image, an (image, query) pair ...) is documented per source.

    ``self[i]`` draws its generator from ``(seed, epoch, i)``; :class:`HybridDataset` instead
    calls :meth:`get_sample` with a generator of its own.

    ``answer_style`` (one of :data:`templates.ANSWER_STYLES`) words the mask answers: ``"plain"``
    (LISA's templates, "Sure, [SEG].") or ``"named"`` (the target named right before its
    ``[SEG]``: "Sure, it is the red square [SEG].", see :func:`templates.mask_answer`), so that
    the language model must carry the request into the ``[SEG]`` state. Sources name what each
    mask shows (a referring expression, a class name ...); text-only answers are never named.
    """

    name: str = "raw"

    def __init__(
        self,
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_questions_per_image < 1:
            raise ValueError(f"num_questions_per_image must be >= 1, got {num_questions_per_image}")
        self.mode: Mode = mode
        self.seed = seed
        self.epoch = 0
        self.num_questions_per_image = num_questions_per_image
        self.answer_style = templates.check_answer_style(answer_style)
        if name is not None:
            self.name = name

    @property
    def is_train(self) -> bool:
        """Whether samples are drawn at random (``mode == "train"``)."""
        return self.mode == "train"

    def set_epoch(self, epoch: int) -> None:
        """Make ``self[i]`` draw different questions in each epoch (train mode)."""
        self.epoch = epoch

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items: images in train mode, scored items in val mode."""

    @abc.abstractmethod
    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        """Build item ``index``; all random choices come from ``rng`` (unused in val mode)."""

    def item_path(self, index: int) -> str | None:
        """The file item ``index`` reads (its image), for messages; None when unknown."""
        return None

    def __getitem__(self, index: int) -> RawSample:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        return self.get_sample(index, derive_rng(self.seed, self.epoch, index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, mode={self.mode!r}, len={len(self)})"


def missing_path_error(what: str, path: str, parent: str) -> FileNotFoundError:
    """An error naming the path looked for and listing what exists next to it."""
    if os.path.isdir(parent):
        found = sorted(os.listdir(parent))
        listing = ", ".join(found) if found else "(empty folder)"
    else:
        listing = f"(folder {parent} does not exist either)"
    return FileNotFoundError(f"{what} not found: {path}; found in {parent}: {listing}")
