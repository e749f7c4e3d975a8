"""Model-ready samples and batches.

A sample is one image with its conversation (any number of turns) and one ground-truth mask per
``[SEG]`` in the answers. :func:`encode_sample` builds it (the processor's outputs whole, plus the
SAM input); :func:`collate` pads a list of them into a batch, right-padded for training and
teacher-forced evaluation, left-padded for generation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .conversation import IGNORE_INDEX, encode_conversation
from .sam import SamTransform

# Per-token fields of the processor output and the value that pads each.
_TOKEN_FIELDS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
# Per-image fields concatenated along their first dimension (Qwen flattens the patches).
_IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


def encode_sample(
    processor,
    sam_transform: SamTransform,
    image: np.ndarray,
    turns: list[tuple[str, str | None]],
    masks: Sequence[np.ndarray] = (),
    **extra: Any,
) -> dict:
    """One model-ready sample.

    Args:
        image: HxWx3 uint8 RGB.
        turns: (question, answer) pairs; a last answer of None leaves the turn open for generation.
        masks: one HxW uint8 mask (1 target, 0 background, 255 ignore) per ``[SEG]`` in the answers.
        extra: carried through untouched (request texts, dataset name, image path...).
    Returns:
        dict with the processor outputs and ``labels`` (see ``encode_conversation``),
        ``sam_pixel_values`` [3, S, S], ``sam_input_size`` (h, w), ``original_size`` (H, W),
        ``masks`` [n, H, W] uint8, and ``extra``.
    """
    sample = encode_conversation(processor, image, turns)
    sam_input = sam_transform.preprocess(image)
    sample["sam_pixel_values"] = sam_input.pixel_values
    sample["sam_input_size"] = sam_input.input_size
    sample["original_size"] = sam_input.original_size
    height, width = sam_input.original_size
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask {index} has shape {mask.shape}, the image is {(height, width)}")
    stacked = np.stack(masks) if len(masks) else np.zeros((0, height, width), np.uint8)
    sample["masks"] = torch.from_numpy(stacked.astype(np.uint8, copy=False))
    sample["extra"] = extra
    return sample


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad and stack samples from :func:`encode_sample`.

    Returns a dict with [B, T] token fields, concatenated image fields, ``sam_pixel_values``
    [B, 3, S, S], and per-sample lists ``sam_input_size``, ``original_size``, ``masks`` (each
    [n_i, H_i, W_i]) and ``extra``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s["input_ids"]) for s in samples)
    batch: dict[str, Any] = {}
    for field, pad_value in _TOKEN_FIELDS.items():
        if field not in samples[0]:
            continue
        value = pad_token_id if pad_value is None else pad_value
        rows = []
        for sample in samples:
            tokens = sample[field]
            padding = tokens.new_full((length - len(tokens),), value)
            rows.append(torch.cat([tokens, padding] if padding_side == "right" else [padding, tokens]))
        batch[field] = torch.stack(rows)
    for field in _IMAGE_FIELDS:
        batch[field] = torch.cat([s[field] for s in samples])
    batch["sam_pixel_values"] = torch.stack([s["sam_pixel_values"] for s in samples])
    for field in ("sam_input_size", "original_size", "masks", "extra"):
        batch[field] = [s[field] for s in samples]
    return batch


VLM_INPUT_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (per-sample lists stay where they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def vlm_inputs(batch: dict) -> dict:
    """The fields of a batch that go to the Qwen-VL model (labels excluded)."""
    return {k: batch[k] for k in VLM_INPUT_FIELDS if k in batch}


class SampleEncoder:
    """``RawSample -> model-ready sample`` (runs in the DataLoader workers).

    Carries the request texts, source dataset, image path and skip count through ``extra``.
    """

    def __init__(self, processor, sam_transform: SamTransform) -> None:
        self.processor = processor
        self.sam_transform = sam_transform

    def __call__(self, raw) -> dict:
        return encode_sample(
            self.processor,
            self.sam_transform,
            raw.image,
            list(raw.turns),
            raw.masks,
            image_path=raw.image_path,
            dataset=raw.dataset,
            requests=list(raw.requests),
            meta={k: v for k, v in raw.meta.items() if k != "skipped_errors"},
            num_skipped=int(raw.meta.get("num_skipped", 0)),
        )
