"""Visual question answering in LLaVA's conversation format (no masks).

On disk: ``<dataset_dir>/llava_dataset/<name>.json``, a list of
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": "<image>\\n..."}, ...]}``.
``image`` is a file name under ``coco/train2017/`` (llava_instruct_150k) or, when it contains a
folder (llava_v1_5_mix665k: ``coco/train2017/...``, ``gqa/images/...``), a path relative to the
dataset root. Records without an image (text-only) are left out.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from utils.data import templates
from utils.data.base import Mode, RawDataset, missing_path_error
from utils.data.compact import CompactRecordList
from utils.data.io import load_image_rgb, read_json
from utils.data.sample import EmptySampleError, RawSample

logger = logging.getLogger(__name__)

ROLE_HUMAN = "human"
ROLE_ASSISTANT = "gpt"


def conversation_turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA conversation, ``<image>`` removed from questions.

    Consecutive messages of one speaker are one message, joined with a newline (a question in
    two parts is asked whole, an answer in two parts is kept whole). A leading assistant message
    and a trailing unanswered question are dropped.
    """
    merged: list[tuple[str, str]] = []  # (role, text), roles alternating
    for message in messages:
        role, text = message.get("from"), str(message.get("value", ""))
        if role == ROLE_HUMAN:
            text = templates.strip_image_placeholder(text)
        elif role == ROLE_ASSISTANT:
            text = text.strip()
        else:  # another speaker (a system note ...) takes no part in the turns
            continue
        if merged and merged[-1][0] == role:
            merged[-1] = (role, "\n".join(part for part in (merged[-1][1], text) if part))
        else:
            merged.append((role, text))
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for role, text in merged:
        if role == ROLE_HUMAN:
            pending = text
        elif pending is not None:
            turns.append((pending, text))
            pending = None
    return turns


class LlavaVqaDataset(RawDataset):
    """LLaVA-Instruct-150k / llava_v1_5_mix665k conversations as text-only turns.

    Items: one per record with an image, in both modes; the whole conversation is kept (LISA
    does the same), truncated to ``max_turns`` if given. ``num_questions_per_image`` does not
    apply. Answers have no ``[SEG]`` and ``masks`` is empty; ``requests`` are the questions.
    ``answer_style`` is accepted (every source takes it) but has nothing to word here.
    Meta: ``record_id``, ``no_target`` (all False).
    """

    def __init__(
        self,
        dataset_dir: str,
        data_name: str = "llava_instruct_150k",
        mode: Mode = "train",
        seed: int = 0,
        num_questions_per_image: int = 3,
        max_turns: int | None = None,
        name: str | None = None,
        answer_style: str = "plain",
    ) -> None:
        super().__init__(mode, seed, num_questions_per_image, name or data_name, answer_style)
        self.dataset_dir = dataset_dir
        self.max_turns = max_turns
        folder = os.path.join(dataset_dir, "llava_dataset")
        path = os.path.join(folder, f"{data_name}.json")
        if not os.path.isfile(path):
            raise missing_path_error(f"VQA data {data_name!r}", path, folder)
        records = read_json(path)
        kept = [
            (str(record.get("id", position)), record["image"], conversation_turns(record.get("conversations", [])))
            for position, record in enumerate(records)
            if record.get("image")
        ]
        kept = [record for record in kept if record[2]]
        if len(kept) < len(records):
            logger.info("%s: %d records without image or answered turn left out", path, len(records) - len(kept))
        self.records = CompactRecordList(kept)
        logger.info("%s (%s): %d conversations", self.name, mode, len(self.records))

    def image_path(self, image: str) -> str:
        """Where a record's image is on disk."""
        if "/" in image:
            return os.path.join(self.dataset_dir, image)
        return os.path.join(self.dataset_dir, "coco", "train2017", image)

    def __len__(self) -> int:
        return len(self.records)

    def item_path(self, index: int) -> str | None:
        return self.image_path(self.records[index][1])

    def get_sample(self, index: int, rng: np.random.Generator) -> RawSample:
        record_id, image, turns = self.records[index]
        image_path = self.image_path(image)
        if self.max_turns is not None:
            turns = turns[: self.max_turns]
        if not turns:
            raise EmptySampleError(f"{image_path}: record {record_id} has no turn")
        return RawSample(
            image=load_image_rgb(image_path, exif_orientation=False),  # as LLaVA saw it
            image_path=image_path,
            dataset=self.name,
            turns=list(turns),
            masks=[],
            requests=[question for question, _ in turns],
            meta={"record_id": record_id, "no_target": [False] * len(turns)},
            dialogue=True,
        )
