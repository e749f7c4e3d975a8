"""Conversations in the checkpoint's own chat template, and their training labels.

One image per conversation, in the first user turn; any number of (question, answer) turns.
Training asks the questions of a sample either as one conversation of several turns (the
default, ``multi_turn``) or as several single-turn conversations (``single_turn``, LISA's way;
``model.batch.encode_sample``'s ``conversation_mode``); either way the image is processed once
(:func:`encode_image`, then each conversation through the processor with those fields), a batch
holds it once and the encoders run once per image (``model.shared_images.shared_images``).

Labels are -100 everywhere except the assistant replies. The reply spans are found from the chat
template itself: the token sequence that opens an assistant turn (the template's generation prompt)
and the token that closes a turn are derived by rendering small probe conversations, so no offset
is hard-coded and any Qwen template (with or without a default system prompt) works.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from transformers import BatchFeature

IGNORE_INDEX = -100


def build_messages(turns: list[tuple[str, str | None]], with_image: bool = True) -> list[dict]:
    """Chat messages for one image and several turns.

    Args:
        turns: (question, answer) pairs; the answer of the last turn may be None, leaving the
            conversation open for generation.
    """
    messages = []
    for index, (question, answer) in enumerate(turns):
        content = [{"type": "text", "text": question}]
        if index == 0 and with_image:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@dataclass(frozen=True)
class TemplateMarkers:
    """Token ids that delimit assistant replies in a chat template."""

    reply_start: tuple[int, ...]  # tokens that open an assistant turn (the generation prompt)
    turn_end: int  # the token that closes a turn (trained, so the model learns to stop)


def template_markers(processor) -> TemplateMarkers:
    """The reply delimiters of the processor's chat template (cached per tokenizer and template)."""
    return _template_markers(processor.tokenizer, processor.chat_template)


@lru_cache(maxsize=8)
def _template_markers(tokenizer, chat_template: str) -> TemplateMarkers:
    probe_reply = "PROBE_REPLY_TEXT"
    user = build_messages([("hello", None)], with_image=False)
    without_prompt = tokenizer.apply_chat_template(user, chat_template=chat_template, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(
        user, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    if not with_prompt.startswith(without_prompt) or with_prompt == without_prompt:
        raise ValueError("the chat template's generation prompt is not a suffix of the conversation")
    reply_start = tokenizer(with_prompt[len(without_prompt):], add_special_tokens=False)["input_ids"]
    full = tokenizer.apply_chat_template(
        build_messages([("hello", probe_reply)], with_image=False), chat_template=chat_template, tokenize=False
    )
    after_reply = full[full.index(probe_reply) + len(probe_reply):]
    turn_end = tokenizer(after_reply, add_special_tokens=False)["input_ids"][0]
    return TemplateMarkers(tuple(reply_start), turn_end)


def assistant_labels(input_ids: torch.Tensor, markers: TemplateMarkers) -> torch.Tensor:
    """Labels for a 1-D token sequence: the reply tokens (and their turn-end token), -100 elsewhere."""
    ids = input_ids.tolist()
    labels = [IGNORE_INDEX] * len(ids)
    start = markers.reply_start
    i = 0
    while i <= len(ids) - len(start):
        if tuple(ids[i : i + len(start)]) != start:
            i += 1
            continue
        j = i + len(start)
        while j < len(ids):
            labels[j] = ids[j]
            if ids[j] == markers.turn_end:
                break
            j += 1
        i = j + 1
    return torch.tensor(labels, dtype=torch.long)


def encode_image(processor, image: np.ndarray) -> dict:
    """The image fields of one HxWx3 uint8 image, as the processor's own call computes them:
    ``pixel_values`` [patches, D] and ``image_grid_thw`` [1, 3]."""
    # channels_last: an image 1 or 3 pixels high would otherwise be taken for channels-first.
    return dict(processor.image_processor(images=[image], return_tensors="pt", input_data_format="channels_last"))


class _EncodedImage:
    """Stands in for a processor's image processor, answering with the fields of an image encoded
    before (:func:`encode_image`): the processor's own call then builds the text around them (the
    image-token count included) without processing the image again. Any other attribute is the
    real image processor's."""

    def __init__(self, image_processor, image_fields: dict) -> None:
        self._image_processor = image_processor
        self._image_fields = image_fields

    def __call__(self, images, **kwargs) -> BatchFeature:
        return BatchFeature(dict(self._image_fields))

    def __getattr__(self, name: str):
        return getattr(self._image_processor, name)


def encode_conversation(
    processor, image: np.ndarray, turns: list[tuple[str, str | None]], image_fields: dict | None = None
) -> dict:
    """Tokenise one image and its turns with the processor; add ``labels`` for training.

    Returns the processor's outputs whole (1-D ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``; ``pixel_values`` [patches, D]; ``image_grid_thw`` [1, 3]) plus
    ``labels``. An open last turn (answer None) gets the generation prompt and no labels there.
    ``image_fields``: the image's :func:`encode_image`, when already computed (several
    conversations about one image process it once).
    """
    if image_fields is not None:
        processor = copy.copy(processor)  # the caller's processor is left as it is (threads share it)
        processor.image_processor = _EncodedImage(processor.image_processor, image_fields)
    add_generation_prompt = turns[-1][1] is None
    text = processor.apply_chat_template(
        build_messages(turns), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # channels_last: as in encode_image.
    encoded = processor(text=[text], images=[image], return_tensors="pt", input_data_format="channels_last")
    sample = {}
    for key, value in encoded.items():
        # Per-token fields lose their batch dimension; the image fields are already per-image.
        sample[key] = value[0] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
    labels = assistant_labels(sample["input_ids"], template_markers(processor))
    if add_generation_prompt:
        labels[:] = IGNORE_INDEX
    else:
        labelled = labels != IGNORE_INDEX
        replies = int(labelled[0]) + int((labelled[1:] & ~labelled[:-1]).sum())
        if replies != len(turns):
            # E.g. a "Thinking" template, whose replies open with a <think> block the generation
            # prompt does not end like: no label at all would be a NaN loss and no [SEG] to train.
            raise ValueError(
                f"the chat template's replies could not be found: {len(turns)} answers, {replies} labelled "
                "(a reasoning 'Thinking' checkpoint? train from an Instruct one)"
            )
    sample["labels"] = labels
    return sample
