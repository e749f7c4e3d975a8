"""Evaluation shared by training validation and test.py: sharded over ranks, reduced exactly.

The teacher-forced protocol (LISA's published one) feeds the reference answer with its ``[SEG]``
tokens and scores the masks those tokens produce. Every sample of the split is visited exactly once
across ranks (:class:`ShardedEvalSampler`, no padding), and the metric sums are all-reduced as
integers, so 1 and N processes give identical numbers.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.batch import SampleEncoder
from utils.data.samplers import ShardedEvalSampler
from utils.data.sample import CorruptSampleError
from utils.metrics import SegmentationMeter, reduce_state_across_ranks, scores_from_state

logger = logging.getLogger(__name__)


class EncodedDataset(Dataset):
    """A raw dataset seen through the sample encoder; unreadable samples become None (counted)."""

    def __init__(self, raw: Dataset, encoder: SampleEncoder) -> None:
        self.raw = raw
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        try:
            return self.encoder(self.raw[index])
        except CorruptSampleError as error:
            logger.warning("evaluation sample %d unreadable, not scored: %s", index, error)
            return None


def _collate_present(model, samples: list, padding_side: str) -> dict | None:
    present = [s for s in samples if s is not None]
    batch = model.collate(present, padding_side=padding_side) if present else None
    return {"batch": batch, "unreadable": len(samples) - len(present)}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


@torch.no_grad()
def evaluate_teacher_forced(
    model,
    raw_dataset: Dataset,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    workers: int = 0,
    precision: str = "fp32",
    description: str = "validate",
    show_progress: bool = True,
) -> dict:
    """Teacher-forced gIoU / cIoU (and the rest of ``utils.metrics``) over a whole split.

    Args:
        model: a ``ReasonSegmenter`` (not wrapped in DDP). Its training mode is restored after.
    Returns:
        the scores of ``utils.metrics.scores_from_state`` plus ``unreadable`` (samples skipped).
    """
    if len(raw_dataset) == 0:
        raise ValueError(f"the evaluation split {description!r} is empty")
    device = model.device
    dataset = EncodedDataset(raw_dataset, SampleEncoder(model.processor, model.sam_transform))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedEvalSampler(len(dataset), rank, world_size),
        collate_fn=partial(_collate_present, model, padding_side="right"),
        num_workers=workers,
    )
    was_training = model.training
    model.eval()
    meter = SegmentationMeter()
    unreadable = 0
    try:
        for item in tqdm(loader, desc=description, disable=not show_progress, leave=False):
            unreadable += item["unreadable"]
            if item["batch"] is None:
                continue
            batch = _to_device(item["batch"], device)
            with autocast_context(device, precision):
                output = model(batch)
            for logits, gt_masks in zip(output.mask_logits, batch["masks"]):
                for prediction, target in zip(logits, gt_masks):
                    meter.update((prediction > 0).cpu().numpy(), target.cpu().numpy())
    finally:
        model.train(was_training)
    state = reduce_state_across_ranks(meter.state(), device=device if device.type == "cuda" else None)
    unreadable_total = int(reduce_state_across_ranks({"unreadable": unreadable})["unreadable"])
    scores = scores_from_state(state)
    scores["unreadable"] = unreadable_total
    return scores
