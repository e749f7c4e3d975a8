"""SAM image-encoder attention through ``torch.nn.functional.scaled_dot_product_attention``.

The official ``segment_anything.modeling.image_encoder.Attention`` computes

    softmax(scale * q @ k^T + B) @ v,   B[(y, x), (i, j)] = rel_h[(y, x), i] + rel_w[(y, x), j]

with explicit matrix products: it writes the whole attention matrix (``[B*heads, HW, HW]``), adds
the decomposed relative-position bias to it in a second pass, runs softmax in a third and reads
it again for ``@ v``. In bf16 that matrix is also rounded to bf16 before the softmax. Every
ViT-H global block (64x64 tokens) thus moves about 3 GB per image, and each call copies a small
index tensor from the CPU to the GPU (``get_rel_pos`` builds it with ``torch.arange`` on the
CPU), which blocks the host until the GPU has caught up, twice per block.

:class:`SdpaAttention` is a drop-in replacement: it *is* an official ``Attention`` (a subclass:
same constructor, same submodules and parameters ``qkv``, ``proj``, ``rel_pos_h``,
``rel_pos_w``, so state-dict keys and strict loading of official checkpoints are unchanged) whose
``forward`` hands the attention to one fused SDPA kernel (scores kept in fp32 on chip, never
written to memory). The relative-position bias reaches the kernel in one of two ways
(``rel_pos_mode``):

``"mask"`` (the default; the way pytorch-labs segment-anything-fast does it)
    the bias ``rel_h[..., :, None] + rel_w[..., None, :]`` is materialised as an additive
    ``attn_mask`` of shape ``[B, heads, HW, HW]`` in the query dtype. Flash attention takes no
    arbitrary mask, so SDPA dispatches to the memory-efficient kernel (or cuDNN's, where enabled).
    Memory: for the global blocks of ViT-H (64x64 = 4,096 tokens, 16 heads) the mask is
    ``[B, 16, 4096, 4096]``, 512 MB per image in bf16 (1 GB in fp32), alive for one block at a
    time -- as large as the official path's own attention matrix, but written once and read once
    instead of written and read three times. Window blocks (14x14 = 196 tokens, 25 windows per
    64x64 image) need 31 MB per image. Where the key length is not a multiple of 8 (196), the
    mask is written into a buffer whose rows are padded to a multiple of 8, so the kernel does
    not make its own aligned copy.
``"fold"``
    no mask at all: the bias is folded into the dot product, ``q' = [scale*q, rel_h, rel_w]``,
    ``k' = [k, onehot(row(key)), onehot(col(key))]`` and ``scale=1``, so that ``q'.k'`` equals
    ``scale*q.k + rel_h[row] + rel_w[col]`` exactly. The head dimension of q and k grows from
    ``d`` to ``d + kh + kw`` (padded to a multiple of 8: ViT-H 80 -> 208 in global blocks, 80 ->
    112 in window blocks), ``v`` keeps ``d``. Extra memory is O(HW * (kh + kw)) instead of
    O(HW^2) (ViT-H global block: 27 MB per image instead of 512 MB), at the price of 2.6x the
    ``q @ k^T`` FLOPs in global blocks (1.8x the attention FLOPs; +5% of the encoder's).
    Different q/v head sizes rule flash out again: the memory-efficient (or cuDNN) kernel runs it.
``"fold_flash"``
    ``"fold"`` with ``v`` zero-padded to the same head size, which makes the flash kernel
    eligible (head size <= 256), at the price of also 2.6x the ``@ v`` FLOPs in global blocks
    (2.6x the attention FLOPs; +10% of the encoder's).

Which one is fastest depends on the GPU's kernels, not on arithmetic alone (the mask moves
~1 GB per image per global block, the folds add ~0.3-0.6 TFLOP per ViT-H image to its 5.96
TFLOP); ``tools/bench_sam_encoder.py`` times all three, with each SDPA backend, on the real
ViT-H, and prints which one won. ``"mask"`` is the default because it adds no FLOPs, is the
approach with a published record (segment-anything-fast) and does not depend on a kernel
accepting unequal or large head sizes; change :data:`DEFAULT_REL_POS_MODE` if the benchmark on
the target GPU says otherwise. Nothing in the model asks for ``"fold"`` or ``"fold_flash"``: they
exist for that benchmark, the measurement that chooses :data:`DEFAULT_REL_POS_MODE`. All modes
compute the same function as the official module (fp32 differences are rounding only, ~1e-6); in
bf16 they are at least as accurate as the official path, whose attention scores are rounded to
bf16 before the softmax.

When it is used: :func:`use_fast_attention` swaps it into a built image encoder (every block,
window and global), in place, keeping the very same parameter tensors; :func:`use_official_attention`
swaps the official module back. :func:`model.sam.build_sam` calls :func:`use_fast_attention` on
every SAM it builds unless given ``attention="official"``, so the segmenter runs this module by
default. It is meant for the frozen encoder (inference and training both) on any device; autograd
works through it too (the memory-efficient and math kernels have backward passes with a mask
that requires grad). ``torch.compile`` traces it without graph breaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.sam import sam_blocks, sam_modeling

if TYPE_CHECKING:  # pragma: no cover
    from segment_anything.modeling import ImageEncoderViT

__all__ = [
    "DEFAULT_REL_POS_MODE",
    "REL_POS_MODES",
    "SdpaAttention",
    "attention_implementation",
    "rel_pos_table",
    "use_fast_attention",
    "use_official_attention",
]

RelPosMode = Literal["mask", "fold", "fold_flash"]
REL_POS_MODES: tuple[str, ...] = ("mask", "fold", "fold_flash")
#: What :func:`use_fast_attention` uses unless told otherwise (see the module docstring).
DEFAULT_REL_POS_MODE: str = "mask"

_image_encoder = sam_modeling().image_encoder
OfficialAttention = _image_encoder.Attention


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """
    The official ``get_rel_pos`` (same interpolation, same index arithmetic in float32, same
    result bit for bit), with the index tensor built on ``rel_pos``'s device, so a CUDA call does
    not copy from the host and synchronise.

    Arguments:
      q_size (int): query size along the axis.
      k_size (int): key size along the axis.
      rel_pos (Tensor): relative position embeddings [L, C].

    Returns:
      (Tensor): [q_size, k_size, C].
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    device = rel_pos.device
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def _decomposed_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """rel_h [N, H, W, H] and rel_w [N, H, W, W] of ``add_decomposed_rel_pos`` (q: [N, H*W, C])."""
    h, w = size
    rh = rel_pos_table(h, h, rel_pos_h).to(q.dtype)
    rw = rel_pos_table(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return rel_h, rel_w


def _bias_mask(rel_h: torch.Tensor, rel_w: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """The additive mask [batch, heads, H*W, H*W] = rel_h[..., :, None] + rel_w[..., None, :].

    Rows are padded to a multiple of 8 elements when they are not already (window blocks: 196),
    which is the alignment the memory-efficient kernel needs; otherwise it pads a copy itself.
    Eager without autograd, the sum is written straight into the padded buffer (``out=``: one
    pass); under autograd or ``torch.compile`` (where ``out=`` into a strided view breaks the
    graph) it is copied into it, which inductor fuses into the same single pass.
    """
    n, h, w, kh = rel_h.shape
    kw = rel_w.shape[-1]
    keys = kh * kw
    padded = _round_up(keys, 8)
    if padded == keys:
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, h * w, keys)
    buffer = rel_h.new_empty(n, h, w, padded)
    target = buffer[..., :keys].unflatten(-1, (kh, kw))
    needs_grad = torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        target.copy_(rel_h[..., :, None] + rel_w[..., None, :])
    else:
        torch.add(rel_h[..., :, None], rel_w[..., None, :], out=target)
    return buffer.view(batch, heads, h * w, padded)[..., :keys]


class SdpaAttention(OfficialAttention):
    """
    The official SAM ``Attention`` (window and global blocks alike) computed with
    ``F.scaled_dot_product_attention``, in the way ``rel_pos_mode`` says ("mask", "fold" or
    "fold_flash"; see the module docstring). Same parameters, same state-dict keys. Input
    [B, H, W, C], output [B, H, W, C].

    Made from a built official module with :meth:`from_official` (as :func:`use_fast_attention`
    does), which shares its parameters instead of allocating new ones.
    """

    @classmethod
    def from_official(cls, attn: nn.Module, rel_pos_mode: str = DEFAULT_REL_POS_MODE) -> "SdpaAttention":
        """A module sharing ``attn``'s submodules and parameters (no copy, no allocation)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _share(attn, new)
        new.rel_pos_mode = _check_mode(rel_pos_mode)
        return new

    def to_official(self) -> nn.Module:
        """An official ``Attention`` sharing this module's submodules and parameters."""
        old = OfficialAttention.__new__(OfficialAttention)
        nn.Module.__init__(old)
        _share(self, old)
        return old

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, use_rel_pos={self.use_rel_pos}, rel_pos_mode={self.rel_pos_mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, h, w, _ = x.shape
        heads = self.num_heads
        # [3, B, heads, H*W, d]: q, k, v stay strided views of the qkv output (last stride 1)
        q, k, v = self.qkv(x).reshape(batch, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        d = q.shape[-1]
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            rel_h, rel_w = _decomposed_terms(q.reshape(batch * heads, h * w, d), self.rel_pos_h, self.rel_pos_w, (h, w))
            if self.rel_pos_mode == "mask":
                mask = _bias_mask(rel_h, rel_w, batch, heads)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            else:
                out = _folded_attention(q, k, v, rel_h, rel_w, self.scale, pad_value=self.rel_pos_mode == "fold_flash")
        # [B, heads, H*W, d] -> [B, H, W, heads*d]
        out = out.transpose(1, 2).reshape(batch, h, w, heads * d)
        return self.proj(out)


def _folded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    pad_value: bool,
) -> torch.Tensor:
    """softmax(scale*q.k + rel_h[row(k)] + rel_w[col(k)]) @ v with the bias folded into q and k."""
    batch, heads, tokens, d = q.shape
    _, h, w, kh = rel_h.shape
    kw = rel_w.shape[-1]
    width = _round_up(d + kh + kw, 8)
    pad = width - (d + kh + kw)
    eye_h = torch.eye(kh, dtype=q.dtype, device=q.device).repeat_interleave(kw, dim=0)  # [kh*kw, kh]
    eye_w = torch.eye(kw, dtype=q.dtype, device=q.device).repeat(kh, 1)  # [kh*kw, kw]
    keys = k.shape[2]
    q_parts = [q * scale, rel_h.reshape(batch, heads, tokens, kh), rel_w.reshape(batch, heads, tokens, kw)]
    k_parts = [k, eye_h.expand(batch, heads, keys, kh), eye_w.expand(batch, heads, keys, kw)]
    if pad:
        q_parts.append(q.new_zeros(batch, heads, tokens, pad))
        k_parts.append(k.new_zeros(batch, heads, keys, pad))
    q_aug = torch.cat(q_parts, dim=-1)
    k_aug = torch.cat(k_parts, dim=-1)
    if not pad_value:
        return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)
    v_aug = F.pad(v, (0, width - d))
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :d]


def _check_mode(mode: str) -> str:
    if mode not in REL_POS_MODES:
        raise ValueError(f"Unknown rel_pos_mode {mode!r}; choose one of {', '.join(REL_POS_MODES)}")
    return mode


def _share(src: nn.Module, dst: nn.Module) -> None:
    """Copies the official Attention's state (same submodule and parameter objects) onto ``dst``."""
    dst.training = src.training
    dst.num_heads = src.num_heads
    dst.scale = src.scale
    dst.use_rel_pos = src.use_rel_pos
    dst.qkv = src.qkv
    dst.proj = src.proj
    if src.use_rel_pos:
        dst.rel_pos_h = src.rel_pos_h
        dst.rel_pos_w = src.rel_pos_w


def use_fast_attention(image_encoder: "ImageEncoderViT", rel_pos_mode: str = DEFAULT_REL_POS_MODE) -> int:
    """
    Makes every block of a SAM image encoder (window and global) compute attention with
    :class:`SdpaAttention`, in place. Parameters are the same tensors (nothing copied, nothing
    allocated), so ``state_dict()`` is unchanged, strict loading of official checkpoints still
    works, and optimisers or other references to the parameters stay valid. Blocks already fast
    get the requested ``rel_pos_mode``. Hooks registered on the old attention modules are not
    carried over. Call it before ``torch.compile``.

    Arguments:
      image_encoder (ImageEncoderViT): ``sam.image_encoder``.
      rel_pos_mode (str): "mask" (default), "fold" or "fold_flash" (see the module docstring).

    Returns:
      (int): the number of attention modules swapped (blocks whose mode was only changed count
        too); e.g. 32 for ViT-H.
    """
    _check_mode(rel_pos_mode)
    swapped = 0
    for block in sam_blocks(image_encoder):
        attn = block.attn
        if isinstance(attn, SdpaAttention):
            if attn.rel_pos_mode != rel_pos_mode:
                attn.rel_pos_mode = rel_pos_mode
                swapped += 1
            continue
        if type(attn) is not OfficialAttention:
            raise TypeError(f"unexpected attention module {type(attn).__name__} in a SAM block")
        block.attn = SdpaAttention.from_official(attn, rel_pos_mode)
        swapped += 1
    return swapped


def use_official_attention(image_encoder: "ImageEncoderViT") -> int:
    """
    The inverse of :func:`use_fast_attention`: puts the official ``Attention`` back in every
    block (same parameter tensors). Returns the number of modules swapped back.
    """
    swapped = 0
    for block in sam_blocks(image_encoder):
        if isinstance(block.attn, SdpaAttention):
            block.attn = block.attn.to_official()
            swapped += 1
    return swapped


def attention_implementation(image_encoder: "ImageEncoderViT") -> str:
    """"official", "sdpa:<mode>" or "mixed" -- what the encoder's blocks use now."""
    kinds = {
        f"sdpa:{b.attn.rel_pos_mode}" if isinstance(b.attn, SdpaAttention) else "official"
        for b in sam_blocks(image_encoder)
    }
    return kinds.pop() if len(kinds) == 1 else "mixed"
