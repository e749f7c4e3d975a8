"""Model-ready samples and batches.

A sample is one image with one or more conversations about it and one ground-truth mask per
``[SEG]`` in the answers. Its turns are asked either as separate single-turn conversations
(``single_turn``, LISA's way and the way evaluation asks them) or as the turns of one conversation
(``multi_turn``); either way the image is encoded once. :func:`encode_sample` builds it (per
conversation the processor's token fields, once the image fields, plus the SAM input);
:func:`collate` pads a list of them into a batch, right-padded for training and teacher-forced
evaluation, left-padded for generation.

A batch has one token row per conversation and one entry per sample (image) everywhere else:
``image_index[r]`` is the sample of row ``r`` (LISA's ``offset``), ``pixel_values`` /
``image_grid_thw`` / ``sam_pixel_values`` hold each image once, and ``masks``, ``extra``,
``original_size``, ``sam_input_size`` and ``image_keys`` are per sample, the masks of a sample in
the order of its ``[SEG]`` tokens across its conversations.

:func:`prepare_image` makes an image's inputs for both models (:class:`ImageInputs`); a
:class:`~model.image_cache.FeatureCache` keeps them for follow-up questions, keyed by
:func:`image_key`.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .constants import CONVERSATION_MODES, MULTI_TURN, SINGLE_TURN
from .conversation import IGNORE_INDEX, encode_conversation, encode_image
from .sam import SamInput, SamTransform, as_rgb_uint8


# Per-token fields of the processor output and the value that pads each.
_TOKEN_FIELDS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
# Per-image fields concatenated along their first dimension (Qwen flattens the patches).
_IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


@dataclass(frozen=True)
class ImageInputs:
    """An image as the models take it, made once however many questions are asked about it.

    Attributes:
        fields: Qwen's image fields, ``pixel_values`` [patches, D] and ``image_grid_thw`` [1, 3].
        sam_input: SAM's uint8 input, its size inside the padding and the original size.
        key: :func:`image_key` of the image, or None; the caches of a request key on it rather
            than hash the (larger) model inputs again.
    """

    fields: dict[str, torch.Tensor]
    sam_input: SamInput
    key: str | None = None


def image_key(processor, sam_transform: SamTransform, image: np.ndarray) -> str:
    """A content hash of an image as the models will see it: its RGB pixels (after
    :func:`model.sam.as_rgb_uint8`, so a PIL palette or CMYK image counts by its colours) and the
    settings that preprocess them (Qwen's image processor, SAM's input size). Equal keys give
    equal :class:`ImageInputs`; a 640x480 image hashes in about 1 ms."""
    pixels = as_rgb_uint8(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.dtype}{pixels.shape};{sam_transform.image_size};".encode())
    digest.update(processor.image_processor.to_json_string().encode())
    digest.update(pixels.data)
    return digest.hexdigest()


def prepare_image(processor, sam_transform: SamTransform, image: np.ndarray, key: str | None = None) -> ImageInputs:
    """Qwen's image fields and SAM's input of one image (``key``: its :func:`image_key`, if the
    caller keys on it).

    The image is made HxWx3 uint8 RGB once (:func:`model.sam.as_rgb_uint8`: grayscale repeated,
    alpha dropped, a PIL image converted as the data sets convert it), and both models are given
    that same array: Qwen's processor would otherwise read a 16-bit or palette PIL image, or a
    grayscale array, its own way (or refuse it).
    """
    image = as_rgb_uint8(image)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # SAM's resize runs beside Qwen's image processor: both spend their time in PIL and numpy,
        # which release the GIL.
        sam_future = pool.submit(sam_transform.preprocess, image)
        fields = encode_image(processor, image)
        sam_input = sam_future.result()
    return ImageInputs(fields, sam_input, key)


MAX_PREPARE_THREADS = 8
"""Threads that preprocess the images of one batch at most (:func:`map_in_threads`; each image's
SAM resize takes one more thread beside them, see :func:`prepare_image`)."""


def prepare_threads(count: int) -> int:
    """Threads :func:`map_in_threads` uses for ``count`` items: no more than the items, the CPUs
    and :data:`MAX_PREPARE_THREADS`."""
    return min(count, os.cpu_count() or 1, MAX_PREPARE_THREADS)


def map_in_threads(function: Callable[..., Any], *iterables: Sequence[Any]) -> list:
    """``[function(*args) for args in zip(*iterables)]``, on up to :data:`MAX_PREPARE_THREADS`
    threads (no more than the CPUs), results in order.

    For the preprocessing of several images (``ReasonSegmenter.predict``): Qwen's image processor
    and SAM's resize spend their time in PIL and numpy, which release the GIL. On 2 CPU cores, 8
    requests of 640x480 take 1.12x less time (``tools/benchmark.py --only preprocessing``): each
    image keeps both cores busy already; more cores have more room.
    """
    arguments = list(zip(*iterables))
    threads = prepare_threads(len(arguments))
    if threads <= 1:
        return [function(*args) for args in arguments]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda args: function(*args), arguments))


def encode_sample(
    processor,
    sam_transform: SamTransform,
    image: np.ndarray,
    turns: list[tuple[str, str | None]],
    masks: Sequence[np.ndarray] = (),
    conversation_mode: str = MULTI_TURN,
    image_inputs: ImageInputs | None = None,
    mask_size: tuple[int, int] | None = None,
    **extra: Any,
) -> dict:
    """One model-ready sample.

    Args:
        image: HxWx3 uint8 RGB.
        turns: (question, answer) pairs; a last answer of None leaves the turn open for generation.
        masks: one HxW uint8 mask (1 target, 0 background, 255 ignore) per ``[SEG]`` in the answers.
        conversation_mode: ``multi_turn`` (one conversation with every turn) or ``single_turn``
            (one conversation per turn, each with the image; the image fields are kept once).
        image_inputs: the image's :func:`prepare_image`, when already made (a cache's).
        mask_size: the (H, W) the predicted masks are given in, when not the image's own: a caller
            that decoded a smaller copy of a photo passes the photo's size, and SAM's mask logits
            are upsampled to it (``original_size``), as they would have been from the photo.
        extra: carried through untouched (request texts, dataset name, image path...).
    Returns:
        dict with ``conversations`` (per conversation the 1-D token fields ``input_ids``,
        ``attention_mask``, ``mm_token_type_ids`` and ``labels``, see ``encode_conversation``),
        the image fields ``pixel_values`` and ``image_grid_thw`` (once), ``sam_pixel_values``
        [3, S, S], ``sam_input_size`` (h, w), ``original_size`` (H, W), ``masks`` [n, H, W] uint8
        (in ``[SEG]`` order across the conversations), ``image_key`` (``image_inputs.key``: None
        unless a cache made them) and ``extra``.
    """
    if conversation_mode not in CONVERSATION_MODES:
        raise ValueError(f"conversation_mode must be one of {CONVERSATION_MODES}, got {conversation_mode!r}")
    if not turns:
        raise ValueError("a sample needs at least one turn")
    groups = [[turn] for turn in turns] if conversation_mode == SINGLE_TURN else [list(turns)]
    image = as_rgb_uint8(image)  # what both models see (see prepare_image); no copy for an RGB array
    if image_inputs is None:
        image_inputs = prepare_image(processor, sam_transform, image)
    sample: dict[str, Any] = {"conversations": [], **image_inputs.fields}
    for group in groups:
        encoded = encode_conversation(processor, image, group, image_inputs.fields)
        sample["conversations"].append({k: encoded[k] for k in _TOKEN_FIELDS if k in encoded})
    sam_input = image_inputs.sam_input
    sample["image_key"] = image_inputs.key
    sample["sam_pixel_values"] = sam_input.pixel_values
    sample["sam_input_size"] = sam_input.input_size
    sample["original_size"] = tuple(mask_size) if mask_size is not None else sam_input.original_size
    height, width = sample["original_size"]
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask {index} has shape {mask.shape}, the image is {(height, width)}")
    stacked = np.stack(masks) if len(masks) else np.zeros((0, height, width), np.uint8)
    sample["masks"] = torch.from_numpy(stacked.astype(np.uint8, copy=False))
    sample["extra"] = extra
    return sample


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad and stack samples from :func:`encode_sample`.

    Returns a dict with [R, T] token fields (one row per conversation, the conversations of a
    sample in order and next to each other), ``image_index`` [R] (the sample of each row),
    concatenated image fields (each image once), ``sam_pixel_values`` [B, 3, S, S] uint8, and per-sample
    lists ``sam_input_size``, ``original_size``, ``masks`` (each [n_i, H_i, W_i]), ``extra`` and
    ``image_keys`` (None where a sample has no key).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    conversations = [conversation for s in samples for conversation in s["conversations"]]
    length = max(len(c["input_ids"]) for c in conversations)
    batch: dict[str, Any] = {}
    for field, pad_value in _TOKEN_FIELDS.items():
        if field not in conversations[0]:
            continue
        value = pad_token_id if pad_value is None else pad_value
        rows = []
        for conversation in conversations:
            tokens = conversation[field]
            padding = tokens.new_full((length - len(tokens),), value)
            rows.append(torch.cat([tokens, padding] if padding_side == "right" else [padding, tokens]))
        batch[field] = torch.stack(rows)
    batch["image_index"] = torch.tensor(
        [index for index, s in enumerate(samples) for _ in s["conversations"]], dtype=torch.long
    )
    for field in _IMAGE_FIELDS:
        batch[field] = torch.cat([s[field] for s in samples])
    batch["sam_pixel_values"] = torch.stack([s["sam_pixel_values"] for s in samples])
    for field in ("sam_input_size", "original_size", "masks", "extra"):
        batch[field] = [s[field] for s in samples]
    batch["image_keys"] = [s.get("image_key") for s in samples]
    return batch


VLM_INPUT_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (per-sample lists stay where they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def vlm_inputs(batch: dict) -> dict:
    """The fields of a batch that go to the Qwen-VL model (labels excluded), each image once.

    When conversations share images (see :func:`shares_images`), call the VLM through
    :func:`model.shared_images.shared_images` instead, which runs the vision tower once per image.
    """
    return {k: batch[k] for k in VLM_INPUT_FIELDS if k in batch}


def row_images(batch: dict) -> list[int]:
    """The sample (image) of each token row: ``image_index``, or one row per sample without it."""
    index = batch.get("image_index")
    return list(range(len(batch["input_ids"]))) if index is None else index.tolist()


def shares_images(batch: dict) -> bool:
    """Whether some rows of the batch are conversations about the same image."""
    return row_images(batch) != list(range(len(batch["sam_pixel_values"])))


class SampleEncoder:
    """``RawSample -> model-ready sample`` (runs in the DataLoader workers).

    ``conversation_mode`` (see :func:`encode_sample`) applies to samples whose turns are separate
    questions; a dialogue (``raw.dialogue``: VQA, where a turn may refer to the previous ones)
    stays one conversation. Carries the request texts, source dataset, image path and skip count
    through ``extra``.
    """

    def __init__(self, processor, sam_transform: SamTransform, conversation_mode: str = MULTI_TURN) -> None:
        if conversation_mode not in CONVERSATION_MODES:
            raise ValueError(f"conversation_mode must be one of {CONVERSATION_MODES}, got {conversation_mode!r}")
        self.processor = processor
        self.sam_transform = sam_transform
        self.conversation_mode = conversation_mode

    def __call__(self, raw) -> dict:
        return encode_sample(
            self.processor,
            self.sam_transform,
            raw.image,
            list(raw.turns),
            raw.masks,
            conversation_mode=MULTI_TURN if getattr(raw, "dialogue", False) else self.conversation_mode,
            image_path=raw.image_path,
            dataset=raw.dataset,
            requests=list(raw.requests),
            meta={k: v for k, v in raw.meta.items() if k != "skipped_errors"},
            num_skipped=int(raw.meta.get("num_skipped", 0)),
        )
