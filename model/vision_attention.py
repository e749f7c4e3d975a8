"""One attention call per layer in the Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

The problem
-----------
In transformers 5.24 the vision attention modules (``VisionAttention``,
``Qwen2_5_VLVisionAttention``, ``Qwen3VLVisionAttention``) receive all patches of a batch as one
packed sequence ``[1, heads, T, head_dim]`` plus ``cu_seqlens`` (the boundaries of the chunks
that attend only among themselves: one chunk per image/frame in full-attention layers, one per
window in Qwen2.5-VL's window layers). Their ``forward`` then branches on
``is_flash_attention_requested(self.config)``, i.e. on whether the string ``"flash"`` occurs in
``config._attn_implementation``:

* flash backends: ONE varlen call with ``cu_seq_lens_q/k`` and ``max_length_q/k``;
* every other backend (``sdpa``, ``eager``): ``lengths.tolist()`` (a host sync), ``torch.split``
  and one attention call per chunk, then ``torch.cat``.

Qwen2.5-VL-7B at 640x480 has 1,564 patches in 30 windows (20 x 64 patches, 4 x 48, 5 x 16,
1 x 12 -- edge windows are shorter), and 28 of its 32 layers are window layers: a batch of two
such images makes 28 x 60 + 4 x 2 = 1,688 SDPA calls (docs: 1,716 measured), each with a few
tiny kernels around it; the GPU idles between launches.

The seam
--------
:func:`use_packed_vision_attention` registers :func:`packed_vision_attention_forward` with
transformers' ``AttentionInterface`` under :data:`PACKED_VISION_ATTENTION` and sets it as the
attention implementation of the vision config(s) only (``vision_config._attn_implementation``;
the text config, hence the language model's attention and its masks, stay untouched). The name
contains ``"flash"`` on purpose: that is exactly what the Qwen vision attention tests to take its
varlen branch, so our function receives ``cu_seq_lens_q`` once per layer and no module or
parameter is replaced (checkpoints and state-dict keys are unchanged). The config is set directly
(the setter ``set_attn_implementation`` would try to import a flash-attention kernel for any name
containing ``"flash"``). Nothing else in the three towers reads the name except
``get_max_seqlen``, which then computes ``max_seqlen`` once per forward (one ``.item()``) instead
of the stock path's ``tolist()`` in every layer. If the function is ever called without
``cu_seq_lens_q`` (a future per-chunk dispatch), it treats the input as one chunk, which is then
still correct.

The packing (shapes)
--------------------
``query``/``key``/``value`` arrive as ``[1, H, T, D]`` (T = all patches of the batch). The N
chunks given by ``cu_seqlens`` (``[N + 1]`` int) are sorted by length and split into groups
(normally one; see below). A group of ``G`` chunks with longest length ``L`` is gathered (one
``index_select`` on the token dimension of the ``[T, H, D]`` view) into ``[G, L, H, D]`` and
handed to SDPA as ``[G, H, L, D]`` (a strided view: the kernels' native BLHD layout) with a
key-padding mask ``[G, 1, 1, L]`` (additive: 0 for real keys, -inf for padding, in the query
dtype; G x L numbers) that broadcasts over heads and query rows; no mask at all when every chunk
of the group has length ``L`` (then CUDA may pick the flash kernel; with a mask it takes the
memory-efficient one). Padded query rows attend to their chunk's real keys (no NaN) and are
dropped. The ``[G * L, H, D]`` outputs of the groups are concatenated and put back into packed order with one
``index_select`` (``inverse``, ``[T]``), giving ``[1, T, H, D]`` as the flash backends return.
When there is a single group without padding and in the original order, both gathers are skipped
(plain views). The index tensors depend only on ``cu_seqlens``, which the tower passes as the
same tensor object to every layer, so they (and the mask) are built once per forward (with one
``tolist()``) and cached (keyed by that tensor's identity and version).

Padded key slots get probability exactly 0, so outputs equal the per-chunk computation up to
floating-point summation order, and gradients (``index_select`` backward is a scatter-add; padded
slots receive exactly zero) equal too.

Real size (Qwen2.5-VL-7B vision: 32 layers, 28 windowed, H=16, D=80, H*D=1280; bf16)
--------------------------------------------------------------------------------------------
* 640x480 image: grid 34 x 46 = 1,564 patches, 30 windows. Window layers: one call on
  ``[30, 16, 64, 80]`` instead of 30 calls; padded q/k/v/out 1,920 x 1,280 x 2 B = 4.9 MB each
  (+23% slots), the mask 30 x 64 x 2 B = 3.8 KB. Attention work per layer: sum(l^2) = 92,560 query-key
  pairs per head vs 30 x 64^2 = 122,880 padded, i.e. 4 * 1280 * pairs = 0.47 vs 0.63 GFLOP
  (+0.16 GFLOP); over 28 window layers +4.4 GFLOP per image, 0.2% of the tower's ~2.0 TFLOP
  (2 x 1,564 patches x 630 M weights) -- negligible next to ~30 launches saved per layer.
  Full-attention layers: one chunk per image; a batch of equal images needs no padding or mask.
* 1,280-token image (5,120 patches, e.g. grid 64 x 80): 80 windows, all 64 patches: no padding,
  no mask; ``[80, 16, 64, 80]`` = 13.1 MB per tensor. Full layers: ``[1, 16, 5120, 80]``, no
  mask, exactly the stock call.
* Why not one block-diagonal mask over the packed sequence: it costs O(T^2) memory and FLOPs.
  For a batch of that 5,120-patch image and a 640x480 one (T = 6,684) the mask has 44.7 M
  entries (45 MB bool, 89 MB as a bf16 additive mask, per call), and the window layers would
  compute 44.7 M pairs instead of ~0.4 M (100x). Padding costs O(G * L) memory and at most
  ``G * L^2`` pairs.
* When padding becomes expensive: padding a short chunk into a group of long ones wastes
  ``L^2 - l^2`` pairs. Mixing that 5,120-patch image with a 640x480 one in a full layer would pad
  1,564 to 5,120: 23.8 M wasted pairs = 122 GFLOP per full layer (~0.5 TFLOP over the 4 full
  layers, about 1 ms), far more than one extra call (~10-20 us). So chunks (sorted by length,
  longest first) are added to the current group while its wasted work stays within
  :data:`MAX_PADDING_FLOPS` (8 GFLOP, about 20 us at 400 TFLOP/s: the price of one more call);
  otherwise a new group, i.e. one more SDPA call, starts. Window layers never come near it (a
  640x480 image wastes 30 K pairs = 0.16 GFLOP), nor do batches of similar images (1,564 vs
  1,204 patches: 1.0 M pairs, 5.1 GFLOP): they take one call per layer; only full-attention
  layers over images of very different sizes take one call per size class instead.

Other generations: Qwen2-VL (H=16, D=80) and Qwen3-VL attend over whole images in every layer
(one chunk per image), so a batch of B images goes from B calls per layer to one.

Limits: ``torch.compile`` breaks the graph at the plan's ``tolist()`` (as the stock path does in
every layer); dropout (``attention_dropout`` is 0.0 in all three) is applied per group by SDPA.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.utils.generic import is_flash_attention_requested

from .lru import LRU

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PADDING_FLOPS",
    "PACKED_VISION_ATTENTION",
    "packed_vision_attention_forward",
    "use_packed_vision_attention",
]

#: The registered attention-implementation name. It must contain ``"flash"``: the Qwen vision
#: attention modules take their single-call varlen branch exactly when it does.
PACKED_VISION_ATTENTION = "packed_sdpa_flash_varlen"

#: Largest wasted padded work (FLOPs: 4 * H * D per padded query-key pair) a group may carry
#: before the next chunk starts a new group, i.e. one more SDPA call. See the module docstring.
MAX_PADDING_FLOPS = 8e9

# The vision attention classes whose dispatch (varlen branch when "flash" is in the name) this
# relies on, by module of definition.
_VISION_ATTENTION_MODULES = {
    "transformers.models.qwen2_vl.modeling_qwen2_vl": "VisionAttention",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl": "Qwen2_5_VLVisionAttention",
    "transformers.models.qwen3_vl.modeling_qwen3_vl": "Qwen3VLVisionAttention",
}

# Backends that split per chunk (so packing helps); flash backends already make one call, and
# other custom backends (flex attention, hub kernels) are left alone.
_PER_CHUNK_BACKENDS = (None, "sdpa", "eager")


@dataclass
class _Group:
    index: torch.Tensor | None  # [G * L] long: packed token of each padded slot (pads point at a real token)
    mask: torch.Tensor | None  # [G, 1, 1, L] bool, True = real key; None when no chunk is padded
    num_chunks: int  # G
    length: int  # L
    additive: dict = field(default_factory=dict)  # dtype -> mask as 0 / -inf in that dtype

    def attn_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``mask`` as an additive mask of ``dtype`` (built once per dtype; SDPA would otherwise
        convert the boolean mask with a few kernels in every layer)."""
        if self.mask is None:
            return None
        if dtype not in self.additive:
            zeros = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self.additive[dtype] = zeros.masked_fill(~self.mask, float("-inf"))
        return self.additive[dtype]


@dataclass
class _Plan:
    groups: list[_Group]
    inverse: torch.Tensor | None  # [T] long: slot of each packed token in the concatenated groups


def _build_plan(cu_seqlens: list[int], total: int, flops_per_pair: int, device: torch.device) -> _Plan:
    """Group the chunks ``[cu[i], cu[i+1])`` and build the gather/scatter indices (see module doc)."""
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to the sequence length {total}, got {cu_seqlens[0]}..{cu_seqlens[-1]}")
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError("cu_seqlens must be non-decreasing")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])  # stable

    # Greedy: longest first; a chunk joins the current group while the group's wasted work stays small.
    members: list[list[int]] = []
    exact = 0  # sum of l^2 over the current group
    for i in order:
        if members:
            group = members[-1]
            longest = lengths[group[0]]
            wasted = (len(group) + 1) * longest**2 - exact - lengths[i] ** 2
            if wasted * flops_per_pair <= MAX_PADDING_FLOPS:
                group.append(i)
                exact += lengths[i] ** 2
                continue
        members.append([i])
        exact = lengths[i] ** 2

    groups: list[_Group] = []
    gathers: list[torch.Tensor] = []
    valids: list[torch.Tensor] = []
    for group in members:
        group.sort()  # original order inside a group: contiguous reads
        longest = max(lengths[j] for j in group)
        starts = torch.tensor([cu_seqlens[j] for j in group])
        sizes = torch.tensor([lengths[j] for j in group])
        offsets = torch.arange(longest)
        valid = offsets[None, :] < sizes[:, None]  # [G, L]
        gather = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # [G, L]
        gathers.append(gather.reshape(-1))
        valids.append(valid.reshape(-1))
        mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
        groups.append(_Group(index=None, mask=mask, num_chunks=len(group), length=longest))

    gather = torch.cat(gathers)
    valid = torch.cat(valids)
    if len(groups) == 1 and groups[0].mask is None and torch.equal(gather, torch.arange(total)):
        return _Plan(groups=groups, inverse=None)  # nothing to move: plain views
    inverse = torch.empty(total, dtype=torch.long)
    inverse[gather[valid]] = torch.arange(gather.numel())[valid]
    for g, index in zip(groups, gathers):
        g.index = index.to(device)
    return _Plan(groups=groups, inverse=inverse.to(device))


# id(cu_seqlens) -> (weakref to it, its version, the plan's parameters, the plan)
_PLANS: LRU[int, tuple] = LRU(8)


def _tensor_version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be modified in place)
        return None


@torch.compiler.disable
def _cached_plan(cu_seqlens: torch.Tensor, total: int, flops_per_pair: int, device: torch.device) -> _Plan:
    """The plan for ``cu_seqlens``; reused across the layers of one forward (same tensor object)."""
    key = id(cu_seqlens)
    # Index/mask tensors made under inference_mode cannot be saved for a later backward.
    params = (total, flops_per_pair, MAX_PADDING_FLOPS, device, torch.is_inference_mode_enabled())
    entry = _PLANS.get(key)
    if (
        entry is not None
        and entry[0]() is cu_seqlens
        and entry[1] == _tensor_version(cu_seqlens)
        and entry[2] == params
    ):
        return entry[3]
    plan = _build_plan([int(x) for x in cu_seqlens.tolist()], total, flops_per_pair, device)
    _PLANS.put(key, (weakref.ref(cu_seqlens), _tensor_version(cu_seqlens), params, plan))
    return plan


def packed_vision_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Block-diagonal (per-chunk) attention over a packed sequence with one SDPA call per group.

    Args:
        query, key, value: ``[1, H, T, D]`` (the packed patches of all images of the batch).
        cu_seq_lens_q, cu_seq_lens_k: ``[N + 1]`` int chunk boundaries (must be equal); ``None``
            means one chunk of length ``T``.
        scaling: softmax scale (``head_dim ** -0.5`` in the Qwen towers).
        dropout: attention dropout probability (0.0 in the Qwen towers).

    Returns:
        ``(attn_output, None)`` with ``attn_output`` ``[1, T, H, D]``, as the flash backends return.
    """
    if attention_mask is not None or is_causal:
        raise ValueError("packed vision attention supports only unmasked, non-causal attention (the Qwen vision towers)")
    if query.shape[0] != 1:
        raise ValueError(f"expected a packed sequence of batch size 1, got query {tuple(query.shape)}")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:
        if cu_seq_lens_q is None or not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
            raise ValueError("packed vision attention needs the same chunks for queries and keys")
    _, heads, total, dim = query.shape
    if key.shape[1] != heads:
        raise ValueError("packed vision attention expects as many key/value heads as query heads")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D] (views)

    if cu_seq_lens_q is None:
        plan = _Plan(groups=[_Group(index=None, mask=None, num_chunks=1, length=total)], inverse=None)
    else:
        plan = _cached_plan(cu_seq_lens_q, total, 4 * heads * dim, query.device)

    outputs = []
    for group in plan.groups:
        shape = (group.num_chunks, group.length, heads, dim)
        if group.index is None:
            qg, kg, vg = (x.reshape(shape) for x in (q, k, v))
        else:
            qg, kg, vg = (x.index_select(0, group.index).view(shape) for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            kg.transpose(1, 2),
            vg.transpose(1, 2),
            attn_mask=group.attn_mask(qg.dtype),
            dropout_p=dropout,
            scale=scaling,
        )  # [G, H, L, D]
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim))  # [G * L, H, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if plan.inverse is not None:
        out = out.index_select(0, plan.inverse)  # [T, H, D]
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention_forward)


def _vision_attention_configs(vlm: nn.Module) -> list:
    """The distinct configs of the vision attention modules of ``vlm`` (normally one)."""
    configs = {}
    for module in vlm.modules():
        expected = _VISION_ATTENTION_MODULES.get(type(module).__module__)
        if expected is not None and type(module).__name__ == expected:
            configs[id(module.config)] = module.config
    return list(configs.values())


def use_packed_vision_attention(vlm: nn.Module) -> bool:
    """Make the Qwen vision tower of ``vlm`` do each layer's attention in one SDPA call.

    Sets :data:`PACKED_VISION_ATTENTION` as the attention implementation of the vision config
    (the one shared by the tower and its attention modules); the language model's config is not
    touched. Works on a bare Qwen2-VL / Qwen2.5-VL / Qwen3-VL model or any module containing one
    (e.g. a peft wrapper). Idempotent.

    Returns:
        True when the vision attention now uses the packed function (it was ``sdpa`` or
        ``eager``, or already packed); False when there is no supported Qwen vision tower or its
        backend is left alone: flash attention (already one varlen call per layer) or any other
        custom backend.
    """
    configs = _vision_attention_configs(vlm)
    if not configs:
        logger.info("packed vision attention: no Qwen vision attention found in %s", type(vlm).__name__)
        return False
    text_config = getattr(getattr(vlm, "config", None), "text_config", None)
    enabled = False
    for config in configs:
        current = config._attn_implementation
        if current == PACKED_VISION_ATTENTION:
            enabled = True
        elif current in _PER_CHUNK_BACKENDS:
            if config is text_config:  # never: the towers have their own config
                raise RuntimeError("the vision attention shares the language model's config")
            config._attn_implementation = PACKED_VISION_ATTENTION
            enabled = True
        else:
            reason = "already one call per layer" if is_flash_attention_requested(config) else "custom backend"
            logger.info("packed vision attention: leaving vision attention %r alone (%s)", current, reason)
    return enabled
