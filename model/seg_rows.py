"""Train the ``[SEG]`` rows of the embedding and LM head without rebuilding the whole matrices.

peft 0.21.2's ``TrainableTokensLayer`` (what ``trainable_token_indices`` installs) builds, on every
forward, a full copy of the wrapped matrix with the trainable rows written in
(``base.weight.index_copy(0, indices, delta)``) and runs the layer on that copy. For
Qwen2.5-VL-7B that is a 152,064 x 3,584 bf16 matrix (1.09 GB) for the embedding and another for
the untied LM head, per forward; the backward then also forms a dense gradient of each whole
matrix only to read a few rows of it. Here the layer runs on the frozen base weight and only the
outputs that depend on a trainable row are replaced:

* embedding: the positions whose input id is a trainable index take the trainable row;
* LM head (or a Linear tied to the embedding): the logit columns of the trainable indices become
  ``hidden @ delta^T``.

The values are those peft computes (the same rows, the same dtype casts); parameter names, the
adapter files and peft's merge / unmerge / disabled-adapter behaviour are unchanged: only the
forward with active, unmerged adapters takes the new path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.trainable_tokens import TrainableTokensLayer

__all__ = ["RowSparseTrainableTokensLayer", "use_row_sparse_trainable_tokens"]


class RowSparseTrainableTokensLayer(TrainableTokensLayer):
    """peft's ``TrainableTokensLayer`` whose active-adapter forward never materialises the matrix.

    Not constructed directly: :func:`use_row_sparse_trainable_tokens` assigns this class to
    existing peft layers, so that their state (parameters, buffers, tied adapter) stays theirs.
    """

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not active_adapters or self.merged or not self._row_sparse_applies(active_adapters):
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            return self._embedding_forward(x, active_adapters)
        return self._linear_forward(x, active_adapters)

    def _row_sparse_applies(self, active_adapters) -> bool:
        # Embedding options under which the rows' values or gradients depend on the whole matrix
        # (max_norm renormalises the weight it is given, in place) or that change the gradient of
        # a row (padding_idx, scale_grad_by_freq): leave those to peft's exact path.
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
                return False
            if base.padding_idx is not None:
                padding = base.padding_idx % base.num_embeddings
                if any(padding in self.token_indices[name] for name in active_adapters):
                    return False
            return True
        return isinstance(base, nn.Linear)

    def _indices_and_rows(self, adapter_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable token ids, shape (k,), and their rows, shape (k, H), in ``weight``'s dtype
        and device (peft casts the delta the same way before writing it into the matrix)."""
        index = torch.tensor(self.token_indices[adapter_name], device=weight.device)
        rows = self.trainable_tokens_delta[adapter_name].to(weight)
        return index, rows

    def _embedding_forward(self, x: torch.Tensor, active_adapters) -> torch.Tensor:
        """Token ids ``x`` of shape (...,) -> embeddings of shape (..., H)."""
        base = self.base_layer
        weight = base.weight
        result = F.embedding(x, weight, padding_idx=base.padding_idx)
        for adapter_name in active_adapters:
            index, rows = self._indices_and_rows(adapter_name, weight)
            match = x.unsqueeze(-1) == index  # (..., k)
            hit = match.any(-1, keepdim=True)  # (..., 1)
            # torch.where rather than a masked write: static shapes (compilable) and the gradient
            # of each trainable row is the sum over the positions that read it, as in peft.
            picked = F.embedding(match.to(torch.int64).argmax(-1), rows)  # (..., H)
            result = torch.where(hit, picked, result)
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            result = result * embed_scale.to(result.dtype)
        return result

    def _linear_forward(self, x: torch.Tensor, active_adapters) -> torch.Tensor:
        """Hidden states ``x`` of shape (..., H) -> logits of shape (..., V).

        No bias, as peft's own path (``F.linear(x, merged_weight)``) has none.
        """
        weight = self.base_layer.weight
        result = F.linear(x, weight)  # (..., V)
        for adapter_name in active_adapters:
            index, rows = self._indices_and_rows(adapter_name, weight)
            # Out of place: the base logits' columns must get no gradient from the replaced ones.
            result = result.index_copy(-1, index, F.linear(x, rows))  # (..., k) into (..., V)
        return result


def use_row_sparse_trainable_tokens(model: nn.Module) -> int:
    """Give every peft ``TrainableTokensLayer`` in ``model`` the row-sparse forward, in place.

    ``model``: a ``PeftModel`` (or any module holding such layers, e.g. the segmenter). Calling it
    again is harmless. Returns the number of layers switched now.
    """
    switched = 0
    for module in model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = RowSparseTrainableTokensLayer
            switched += 1
    return switched
