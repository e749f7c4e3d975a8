"""Projection from a ``[SEG]`` hidden state to a SAM sparse prompt embedding."""

from __future__ import annotations

import torch
from torch import nn


class SegProjection(nn.Module):
    """Linear(H, H) -> ReLU -> Linear(H, P), as in LISA.

    Args:
        hidden_size: H, the language model's hidden size (``text_config.hidden_size``).
        prompt_dim: P, SAM's prompt embedding size (256 for the official variants).
    """

    def __init__(self, hidden_size: int, prompt_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, prompt_dim)

    def forward(self, seg_states: torch.Tensor) -> torch.Tensor:
        """[N, H] hidden states -> [N, 1, P] sparse prompt embeddings (one prompt token per mask)."""
        return self.fc2(self.act(self.fc1(seg_states))).unsqueeze(1)
