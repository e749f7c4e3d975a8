"""Mask losses with ignore pixels (ground truth 255) left out of both terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import IGNORE_LABEL


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE of each mask, averaged over its valid pixels.

    Args:
        logits: [..., H, W] float mask logits (one mask or a stack of masks).
        target: [..., H, W] uint8 ground truth (1 target, 0 background, 255 ignore).
    Returns:
        [...] one loss per mask (a scalar for one mask); 0 (still attached to ``logits``) for a
        mask whose pixels are all ignored.
    """
    valid = target != IGNORE_LABEL
    per_pixel = F.binary_cross_entropy_with_logits(logits, (target == 1).to(logits.dtype), reduction="none")
    return (per_pixel * valid).sum((-2, -1)) / valid.sum((-2, -1)).clamp(min=1)


def mask_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss on sigmoid probabilities of each mask over its valid pixels ([..., H, W] -> [...]).

    ``smooth`` is added to numerator and denominator. LISA divides both by 1000 and adds 1e-6,
    a smoothing of 0.001 in pixel units; 1 keeps the loss of an empty target bounded and smooth
    without changing the loss of a target of more than a few pixels.
    """
    valid = (target != IGNORE_LABEL).to(logits.dtype)
    prob = logits.sigmoid() * valid
    gt = (target == 1).to(logits.dtype)
    numerator = 2 * (prob * gt).sum((-2, -1)) + smooth
    denominator = prob.sum((-2, -1)) + gt.sum((-2, -1)) + smooth
    return 1 - numerator / denominator
