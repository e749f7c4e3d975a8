"""SAM's image encoder compiled block by block (``--compile_sam``), the eager encoder its fallback.

Each block's ``forward`` becomes ``torch.compile(block.forward)`` kept on the block instance. No
module is wrapped or replaced, so module and parameter names, ``state_dict()``, strict loading of
official checkpoints and training checkpoints are unchanged, and deleting the attribute gives the
eager block back. Dynamo keys its cache on the code and treats a module's parameters as graph
inputs, so all window blocks share one graph and all global blocks another: ViT-H compiles two
graphs per batch size, not 32 (``tests/test_sam_compile.py`` counts them). SAM's input is always
S x S, hence ``dynamic=False``; each new batch size compiles once more, up to
:data:`MAX_COMPILED_VARIANTS`.

The first call of a shape pays the compile. If compiling fails (no Triton, no C++ compiler, an
operator the compiler cannot take), the encoder logs a warning and runs eagerly from then on. The
compiled encoder's outputs are the eager one's (fp32: within 1e-4; bf16 on the H200 below: a max
abs difference of 0.078 on values up to 4.1).

Measured on one H200 (2026-11-30, SAM ViT-H, bf16, torch 2.11;
``docs/benchmarks/2026-11-30-h200-*.json``): 19.7 ms per 1024x1024 image compiled against 32.4 ms
eager (SDPA; floor 7.6 ms), after a compile of 7.6 s (21 s as the process's first compile); a
``train_ddp.py`` step at batch 2, 0.263 s against 0.315 s, peak 25.9 against 27.0 GB. Hence
:func:`resolve_compile_sam`: on by default on CUDA, off on a CPU and for a process that answers
one request.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .sam import sam_blocks

logger = logging.getLogger(__name__)

MAX_COMPILED_VARIANTS = 64
"""Compiled variants of a block's ``forward`` (two per batch size: window and global blocks) before
a new batch size runs eagerly. torch's own limit (``recompile_limit``, 8) would fail the fifth
batch size, which a training run's or an evaluation's last partial batch easily is."""


def resolve_compile_sam(flag: bool | None, device: torch.device | str, one_request: bool = False) -> bool:
    """Whether to compile SAM's image encoder: ``flag`` (``--compile_sam`` / ``--no-compile_sam``)
    when given; ``None`` (auto): on a CUDA ``device``, unless the process answers ``one_request``
    (a one-shot ``inference.py`` question would pay the compile for one image)."""
    if flag is not None:
        return bool(flag)
    return torch.device(device).type == "cuda" and not one_request


def compile_image_encoder_as_asked(
    image_encoder: nn.Module, flag: bool | None, device: torch.device | str, one_request: bool = False
) -> bool:
    """:func:`compile_image_encoder` where :func:`resolve_compile_sam` says so (``--compile_sam``
    and its default); returns whether it did."""
    if not resolve_compile_sam(flag, device, one_request):
        return False
    compile_image_encoder(image_encoder)
    return True


def compile_image_encoder(image_encoder: nn.Module, backend: str = "inductor", mode: str | None = None) -> None:
    """Compile every block of ``image_encoder`` (``sam.image_encoder``) in place; see the module
    docstring. ``backend`` and ``mode`` go to ``torch.compile``."""
    blocks = sam_blocks(image_encoder)
    for block in blocks:
        eager_forward = type(block).forward.__get__(block)
        block.forward = torch.compile(eager_forward, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    logger.info("SAM's image encoder: %d blocks compiled (%s); the first batch of each size pays the compile",
                len(blocks), backend)


def uncompile_image_encoder(image_encoder: nn.Module) -> None:
    """Give every block its eager ``forward`` back."""
    for block in sam_blocks(image_encoder):
        block.__dict__.pop("forward", None)


def image_encoder_is_compiled(image_encoder: nn.Module) -> bool:
    """Whether :func:`compile_image_encoder` is in effect."""
    return any("forward" in block.__dict__ for block in sam_blocks(image_encoder))


def run_image_encoder(image_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``image_encoder(pixels)``: [B, 3, S, S] -> [B, P, S/patch, S/patch]. A compiled encoder that
    cannot be compiled warns once and runs eagerly from then on; a batch size past
    :data:`MAX_COMPILED_VARIANTS` runs eagerly, the sizes compiled before stay compiled."""
    if not image_encoder_is_compiled(image_encoder):
        return image_encoder(pixels)
    try:
        # Each batch size is a recompile of the blocks' forward: allow them up to our own limit.
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_VARIANTS):
            return image_encoder(pixels)
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before a block ran: nothing to undo
        logger.warning("SAM's image encoder is compiled for %d shapes already; a batch of %d runs eagerly",
                       MAX_COMPILED_VARIANTS, len(pixels))
        with torch.compiler.set_stance("force_eager"):
            return image_encoder(pixels)
    except torch._dynamo.exc.TorchDynamoException as error:
        cause = getattr(error, "inner_exception", None) or error  # the backend's own error
        logger.warning("compiling SAM's image encoder failed (%s: %s); running it eagerly from now on",
                       type(cause).__name__, str(cause).strip().splitlines()[0] if str(cause).strip() else "")
        uncompile_image_encoder(image_encoder)
        return image_encoder(pixels)
