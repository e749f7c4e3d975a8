"""SAM (Segment Anything) for the reasoning-segmentation model.

This module is the project's single entry point to SAM. It provides:

* :func:`sam_modeling` -- imports ``segment_anything.modeling`` without importing torchvision.
  ``import segment_anything`` needs torchvision (the package ``__init__`` imports the predictor),
  the modeling code itself does not.
* :data:`SAM_VARIANTS` / :class:`SamVariantSpec` -- the official ViT-B/L/H configurations
  (identical to ``segment_anything/build_sam.py``) and a ``"tiny"`` configuration for tests and
  CPU demos.
* :func:`build_sam` -- builds the official :class:`segment_anything.modeling.Sam` module (so the
  state-dict keys are the official ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)
  and optionally loads a checkpoint strictly, with clear errors for missing, corrupt,
  wrong-variant and non-SAM files. :func:`detect_sam_variant` and
  :func:`infer_variant_from_checkpoint` identify the variant in a state dict or file.
* :class:`SamTransform` / :func:`postprocess_masks` -- SAM's pre- and postprocessing. Every
  part of the project (datasets, model, evaluation, demo) must use these and nothing else.
* :func:`freeze_for_segmentation` -- the LISA training setup (frozen image and prompt encoders,
  trainable mask decoder).

How the pieces fit together for one image and ``n`` [SEG] tokens (the mask decoder runs through
:func:`model.mask_decoding.decode_low_res_masks`, which takes the prompts of several images at once)::

    sam = build_sam("vit_h", "weights/sam_vit_h_4b8939.pth")
    transform = SamTransform.from_sam(sam)
    sam_input = transform.preprocess(image)                      # image: HxWx3 uint8 RGB
    pixels = transform.normalize(sam_input.pixel_values[None], [sam_input.input_size])
    emb = sam.image_encoder(pixels)                              # [1, C, h, w], h = w = S/patch
    low_res = decode_low_res_masks(sam, emb, torch.zeros(n, dtype=torch.long), seg_prompts)
    # seg_prompts: [n, 1, C], all on image 0; low_res: [n, 1, 4h, 4w] (S/4 x S/4 for ViT-B/L/H)
    masks = postprocess_masks(low_res, sam_input.input_size, sam_input.original_size,
                              transform.image_size)              # [n, 1, H, W] logits

``pixel_values`` are resized and padded uint8; :meth:`SamTransform.normalize` turns them into
the encoder's input on its device. Never feed them through ``Sam.preprocess`` as well (that
would normalise twice).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.data.io import to_rgb

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from segment_anything.modeling import Sam

__all__ = [
    "SAM_CHECKPOINT_URLS",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "SAM_VARIANTS",
    "SamCheckpointError",
    "SamInput",
    "SamTransform",
    "SamVariantSpec",
    "as_rgb_uint8",
    "build_sam",
    "detect_sam_variant",
    "freeze_for_segmentation",
    "get_preprocess_shape",
    "infer_variant_from_checkpoint",
    "postprocess_masks",
    "sam_blocks",
    "sam_image_size",
    "sam_modeling",
    "sam_prompt_embed_dim",
]

logger = logging.getLogger(__name__)

#: SAM's normalisation constants, on 0-255 RGB.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: Official checkpoints (https://github.com/facebookresearch/segment-anything#model-checkpoints).
SAM_CHECKPOINT_URLS: dict[str, str] = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

#: Image-encoder attentions :func:`build_sam` offers (see its ``attention`` argument).
SAM_ATTENTIONS = ("sdpa", "official")


# ---------------------------------------------------------------------------------------------
# Importing segment_anything.modeling without torchvision
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def sam_modeling() -> ModuleType:
    """
    Returns the ``segment_anything.modeling`` module without importing torchvision.

    If ``segment_anything`` is already imported (e.g. on a machine with torchvision, where the
    user imported it normally), its ``modeling`` subpackage is used as is. Otherwise the installed
    package is located with ``importlib.util.find_spec`` (which does not execute it), an
    unexecuted module object for the package is registered in ``sys.modules`` so that the
    subpackage can be imported without running the package ``__init__``, and
    ``segment_anything.modeling`` is imported.

    The bare package entry stays in ``sys.modules`` only where torchvision is not installed
    (there a real ``import segment_anything`` could not succeed anyway, and keeping the entry lets
    the modeling classes be found by name, e.g. when unpickling). Where torchvision is installed
    the entry is removed again, so a later ``from segment_anything import SamPredictor`` runs the
    real ``__init__`` and gets the same ``modeling`` classes.

    Returns:
      (ModuleType): ``segment_anything.modeling`` (Sam, ImageEncoderViT, PromptEncoder,
        MaskDecoder, TwoWayTransformer).
    """
    package = "segment_anything"
    if package in sys.modules:
        return importlib.import_module(f"{package}.modeling")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "segment-anything is not installed. Install it with `pip install segment-anything` "
            "(or `pip install git+https://github.com/facebookresearch/segment-anything.git`); "
            "torchvision is not needed."
        )
    bare = importlib.util.module_from_spec(spec)  # not executed: its __init__ needs torchvision
    sys.modules[package] = bare
    try:
        modeling = importlib.import_module(f"{package}.modeling")
    except BaseException:
        if sys.modules.get(package) is bare:
            del sys.modules[package]
        raise
    if importlib.util.find_spec("torchvision") is not None and sys.modules.get(package) is bare:
        del sys.modules[package]
    return modeling


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamVariantSpec:
    """
    Hyper-parameters of one SAM configuration. Defaults are the official values shared by
    ViT-B/L/H (``segment_anything/build_sam.py``).

    Arguments:
      encoder_embed_dim (int): ViT width.
      encoder_depth (int): number of ViT blocks.
      encoder_num_heads (int): attention heads per ViT block.
      encoder_global_attn_indexes (tuple(int)): blocks using global instead of window attention.
      image_size (int): side S of the square model input (the longest image side is resized to S).
      patch_size (int): ViT patch size; the image embedding is (S/patch) x (S/patch).
      window_size (int): window-attention size of the non-global blocks.
      encoder_mlp_ratio (float): ViT MLP hidden size / width.
      prompt_embed_dim (int): width C of image embeddings, prompt embeddings and mask decoder.
      mask_in_chans (int): hidden channels of the prompt encoder's mask downscaling.
      decoder_depth (int): blocks of the mask decoder's TwoWayTransformer.
      decoder_mlp_dim (int): MLP hidden size of the TwoWayTransformer.
      decoder_num_heads (int): attention heads of the TwoWayTransformer.
      iou_head_depth (int): layers of the IoU prediction head.
      iou_head_hidden_dim (int): hidden size of the IoU prediction head.
      num_multimask_outputs (int): masks predicted when ``multimask_output=True``.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError("encoder_embed_dim must be divisible by encoder_num_heads")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError("encoder_global_attn_indexes must lie in [0, encoder_depth)")

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid, S / patch_size (64 for the official variants)."""
        return self.image_size // self.patch_size


SAM_VARIANTS: dict[str, SamVariantSpec] = {
    "vit_h": SamVariantSpec(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    "vit_l": SamVariantSpec(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_b": SamVariantSpec(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    # Random-weight SAM for tests and CPU demos: 256x256 input, patch 8 (32x32 embeddings, 128x128
    # low-res masks: fine enough for small shapes), windowed attention only (a global block over
    # 1024 tokens made the frozen encoder 5x slower); same module classes as the official variants.
    "tiny": SamVariantSpec(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(),
        image_size=256,
        patch_size=8,
        window_size=8,
        prompt_embed_dim=64,
        decoder_mlp_dim=128,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def _check_variant(variant: str) -> SamVariantSpec:
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; valid variants: {', '.join(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def _build_from_spec(spec: SamVariantSpec) -> "Sam":
    m = sam_modeling()
    grid = spec.image_embedding_size
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=spec.encoder_mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=spec.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class SamCheckpointError(ValueError):
    """A SAM checkpoint file exists but cannot be used (corrupt, wrong variant, not SAM)."""


_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def _signature(state_dict: Mapping[str, Any]) -> dict[str, int] | None:
    """Architecture numbers readable from a SAM state dict's shapes (None if not SAM-like)."""
    patch = state_dict.get(_PATCH_KEY)
    if patch is None or len(getattr(patch, "shape", ())) != 4:
        return None
    sig = {
        "encoder_embed_dim": int(patch.shape[0]),
        "patch_size": int(patch.shape[-1]),
        "encoder_depth": len({m.group(1) for k in state_dict if (m := _BLOCK_RE.match(k))}),
    }
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is not None and len(pos.shape) == 4:  # [1, S/p, S/p, D]
        sig["image_size"] = int(pos.shape[1]) * sig["patch_size"]
    no_mask = state_dict.get("prompt_encoder.no_mask_embed.weight")  # [1, C]
    if no_mask is not None and len(no_mask.shape) == 2:
        sig["prompt_embed_dim"] = int(no_mask.shape[1])
    lin1 = state_dict.get("mask_decoder.transformer.layers.0.mlp.lin1.weight")  # [mlp, C]
    if lin1 is not None and len(lin1.shape) == 2:
        sig["decoder_mlp_dim"] = int(lin1.shape[0])
    return sig


def _describe(sig: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sig.items())


def detect_sam_variant(state_dict: Mapping[str, Any]) -> str | None:
    """
    Identifies the SAM variant of a state dict from its tensor shapes (no values are read, so
    meta tensors work).

    Arguments:
      state_dict (Mapping[str, Tensor]): SAM state dict with the official key names.

    Returns:
      (str or None): a key of SAM_VARIANTS, or None if the state dict is not SAM or matches no
        known variant.
    """
    sig = _signature(state_dict)
    if sig is None:
        return None
    for name, spec in SAM_VARIANTS.items():
        if all(getattr(spec, k) == v for k, v in sig.items()):
            return name
    return None


def _download_hint(variant: str | None) -> str:
    urls = " , ".join(f"{v}: {u}" for v, u in SAM_CHECKPOINT_URLS.items())
    hint = (
        f"Download the official SAM weights ({urls}) and put them in weights/ "
        f"(e.g. weights/{SAM_CHECKPOINT_URLS['vit_h'].rsplit('/', 1)[-1]})."
    )
    if variant == "tiny":
        hint += " The 'tiny' variant has no official weights: build it without a checkpoint."
    return hint


def _unwrap(obj: Any) -> Any:
    """Returns the state dict nested under "model" / "state_dict" (up to two levels), if any."""
    for _ in range(2):
        if not isinstance(obj, Mapping) or _PATCH_KEY in obj:
            break
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _read_state_dict(path: str | os.PathLike, variant: str | None, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file into a flat state dict, raising errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAM checkpoint not found: '{path}'. {_download_hint(variant)}")
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint '{path}' is not a file; pass the checkpoint file itself.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower() and "weights only" not in str(err).lower():
            raise SamCheckpointError(
                f"SAM checkpoint '{path}' looks truncated or corrupt ({type(err).__name__}: {err}). "
                f"Re-download it. {_download_hint(variant)}"
            ) from err
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' contains pickled Python objects that "
            "torch.load(weights_only=True) refuses to load. If you trust the file, load it "
            "yourself and re-save only the model's state_dict() with torch.save."
        ) from err
    except Exception as err:  # zip / safetensors / EOF errors of every kind
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' looks truncated or corrupt and could not be read "
            f"({type(err).__name__}: {err}). Re-download it. {_download_hint(variant)}"
        ) from err
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping) or _signature(obj) is None:
        raise SamCheckpointError(_not_sam_message(path, obj))
    return dict(obj)


def _not_sam_message(path: Path, obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"'{path}' is not a SAM checkpoint: it holds a {type(obj).__name__}, not a state dict."
    keys = [str(k) for k in obj]
    msg = f"'{path}' is not a SAM checkpoint: it has no '{_PATCH_KEY}' key ({len(keys)} keys"
    msg += f", e.g. {', '.join(keys[:5])})." if keys else ")."
    prefixed = [k for k in keys if k.endswith("." + _PATCH_KEY)]
    if prefixed:
        prefix = prefixed[0][: -len(_PATCH_KEY)]
        msg += f" Its SAM weights are under the prefix '{prefix}': strip it and save the result."
    return msg


def infer_variant_from_checkpoint(path: str | os.PathLike) -> str:
    """
    Identifies the SAM variant stored in a checkpoint file (.pth/.pt or .safetensors).

    Arguments:
      path (str or PathLike): checkpoint file.

    Returns:
      (str): a key of SAM_VARIANTS.

    Raises:
      FileNotFoundError: the file does not exist.
      SamCheckpointError (ValueError): unreadable, not SAM, or no known variant.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        # Shapes only: nothing but the header is read.
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state_dict: Mapping[str, Any] = {
                    k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                }
        except Exception:
            state_dict = _read_state_dict(path, None)  # raises the detailed error
        if _signature(state_dict) is None:
            raise SamCheckpointError(_not_sam_message(path, state_dict))
    else:
        state_dict = _read_state_dict(path, None, mmap=True)
    variant = detect_sam_variant(state_dict)
    if variant is None:
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' matches no known variant ({_describe(_signature(state_dict) or {})}); "
            f"known variants: {', '.join(SAM_VARIANTS)}."
        )
    return variant


def build_sam(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    fp32_modules: Sequence[str] = ("prompt_encoder",),
    attention: str = "sdpa",
) -> "Sam":
    """
    Builds the official ``segment_anything.modeling.Sam`` module of a variant, in eval mode.

    With a checkpoint nothing is allocated before the weights are read: the module is built on
    the ``meta`` device, the file is read memory-mapped (``torch.load(mmap=True,
    weights_only=True)`` or safetensors), each tensor is cast to its dtype on ``device`` one at a
    time, and the results become the module's weights (``load_state_dict(assign=True)``). A bf16
    SAM ViT-H therefore never exists in float32 in memory, and a file already in ``dtype`` on the
    CPU is not copied at all.

    Arguments:
      variant (str): "vit_h", "vit_l", "vit_b" or "tiny" (see SAM_VARIANTS).
      checkpoint (str, PathLike or None): optional weights. ``.safetensors`` files are read with
        ``safetensors.torch.load_file``; anything else with
        ``torch.load(map_location="cpu", weights_only=True, mmap=True)``. A plain state dict (the
        official format) or one nested under a "model" / "state_dict" key. Loaded with
        ``strict=True``. Without a checkpoint the weights are random (SAM's own initialisation).
      dtype (torch.dtype): dtype of the floating-point weights (default float32).
      device (str, torch.device or None): where the weights live (None: the current default
        device, e.g. build inside ``with torch.device("meta"):`` to get shapes only).
      fp32_modules (sequence of str): top-level parts ("image_encoder", "prompt_encoder",
        "mask_decoder") kept in float32 whatever ``dtype`` is. The prompt encoder is by default:
        its positional encoding multiplies a float32 coordinate grid. Add "mask_decoder" when it
        is to be trained (its master weights, read from the file without a bf16 round trip).
      attention (str): the image encoder's attention: "sdpa" (default; one fused
        ``scaled_dot_product_attention`` call per block with the relative-position bias, see
        :mod:`model.sam_attention`: the same function, parameters and state-dict keys) or
        "official" (``segment_anything``'s own explicit-matrix attention, for comparison).

    Returns:
      (Sam): eval mode, on ``device``, floating weights in ``dtype`` except ``fp32_modules``.

    Raises:
      ValueError: unknown variant.
      FileNotFoundError: the checkpoint does not exist (the message says where to download it).
      SamCheckpointError (ValueError): the file is truncated/corrupt, is not SAM, or holds
        another variant (e.g. "expected vit_h, file contains vit_b").
    """
    spec = _check_variant(variant)
    if attention not in SAM_ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(SAM_ATTENTIONS)}, got {attention!r}")
    device = torch.device(device) if device is not None else torch.get_default_device()
    keep_fp32 = tuple(f"{name}." for name in fp32_modules)

    def target_dtype(name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        return torch.float32 if name.startswith(keep_fp32) else dtype

    if checkpoint is None:
        with device:
            sam = _build_from_spec(spec)
        for name, param in sam.named_parameters():
            wanted = target_dtype(name, param)
            if param.dtype != wanted:
                param.data = param.data.to(wanted)
        return _with_attention(sam.eval(), attention)

    # Read and check the file before building: a wrong file fails fast, without a ViT-H init.
    state_dict = _read_state_dict(checkpoint, variant, mmap=True)
    found = detect_sam_variant(state_dict)
    if found != variant:
        what = found if found is not None else (
            f"a SAM state dict matching no known variant ({_describe(_signature(state_dict) or {})})"
        )
        raise SamCheckpointError(
            f"SAM checkpoint '{checkpoint}' holds a different variant: expected {variant}, "
            f"file contains {what}. Pass the matching variant"
            + (f" (build_sam({found!r}, ...))" if found else "")
            + " or the right file."
        )
    with torch.device("meta"):
        sam = _build_from_spec(spec)
    sam.eval()
    for name in list(state_dict):  # one tensor at a time; same dtype and device: no copy
        tensor = state_dict[name]
        if isinstance(tensor, torch.Tensor):
            state_dict[name] = tensor.to(device=device, dtype=target_dtype(name, tensor))
    try:
        sam.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise SamCheckpointError(
            f"SAM checkpoint '{checkpoint}' does not match the {variant} architecture: {err}"
        ) from err
    # The pixel statistics are not saved (non-persistent buffers): set them again.
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN, device=device).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD, device=device).view(-1, 1, 1), False)
    left = [name for name, t in (*sam.named_parameters(), *sam.named_buffers()) if t.is_meta]
    if left and device.type != "meta":
        raise RuntimeError(f"SAM tensors not loaded from '{checkpoint}': {', '.join(left[:5])}")
    logger.info("Loaded SAM %s weights from %s (%s)", variant, checkpoint, str(dtype).removeprefix("torch."))
    return _with_attention(sam, attention)


def _with_attention(sam: "Sam", attention: str) -> "Sam":
    if attention == "sdpa":
        from .sam_attention import use_fast_attention

        use_fast_attention(sam.image_encoder)
    return sam


def sam_blocks(image_encoder: torch.nn.Module) -> torch.nn.ModuleList:
    """The ViT blocks (window and global) of a SAM image encoder (``sam.image_encoder``)."""
    blocks = getattr(image_encoder, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a SAM ImageEncoderViT (with .blocks), got {type(image_encoder).__name__}")
    return blocks


def sam_image_size(sam: "Sam") -> int:
    """Side S of the square input of a built SAM (1024 for official variants, 256 for tiny)."""
    return int(sam.image_encoder.img_size)


def sam_prompt_embed_dim(sam: "Sam") -> int:
    """Width C of SAM's prompt embeddings (256 for official variants, 64 for tiny)."""
    return int(sam.prompt_encoder.embed_dim)


# ---------------------------------------------------------------------------------------------
# Pre- and postprocessing
# ---------------------------------------------------------------------------------------------


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """
    Output (h, w) of resizing an (oldh, oldw) image so its longest side is long_side_length.
    Same arithmetic as ``ResizeLongestSide.get_preprocess_shape``: round half up, int(x + 0.5),
    except that a side never rounds to 0 (an image over 2048:1, where the official one fails).
    """
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


@dataclass(frozen=True)
class SamInput:
    """
    One image prepared for SAM's image encoder.

    Attributes:
      pixel_values (torch.Tensor): [3, S, S] uint8, the resized image zero-padded bottom/right
        (normalised on the model's device by :meth:`SamTransform.normalize`).
      input_size (tuple(int, int)): (h, w) of the resized image inside pixel_values.
      original_size (tuple(int, int)): (H, W) of the image given to preprocess.
    """

    pixel_values: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def as_rgb_uint8(image: Any) -> np.ndarray:
    """Validates an image and returns it as a C-contiguous HxWx3 uint8 RGB array (see
    :class:`SamTransform` for what is accepted; :func:`model.batch.prepare_image` gives Qwen the
    same array)."""
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Expected an HxWx3 uint8 RGB numpy array (or a PIL image), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"Expected a uint8 image (0-255 RGB), got dtype {image.dtype}; convert it first, e.g. "
            "(img * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if image.ndim == 2:  # grayscale
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA: alpha dropped, not composited
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"Expected an image of shape HxWx3 (RGB), HxWx4 (RGBA) or HxW (gray), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Empty image of shape {image.shape}")
    return np.ascontiguousarray(image)


def postprocess_masks(
    low_res_masks: torch.Tensor,
    input_size: Sequence[int],
    original_size: Sequence[int],
    image_size: int,
) -> torch.Tensor:
    """
    Removes the padding and brings mask logits back to the original image size, exactly like
    ``Sam.postprocess_masks``: bilinear upsampling to S x S, crop to input_size, bilinear resize to
    original_size (align_corners=False). Differentiable.

    Arguments:
      low_res_masks (torch.Tensor): [N, C, h, w] mask logits from the mask decoder (h = w =
        4 S/patch: S/4 for ViT-B/L/H).
      input_size (tuple(int, int)): (h, w) of the resized image before padding (SamInput.input_size).
      original_size (tuple(int, int)): (H, W) of the original image (SamInput.original_size).
      image_size (int): S, the model input side (see sam_image_size).

    Returns:
      (torch.Tensor): [N, C, H, W] mask logits; threshold at 0 (Sam.mask_threshold) for masks.
    """
    if low_res_masks.ndim != 4:
        raise ValueError(f"low_res_masks must be [N, C, h, w], got shape {tuple(low_res_masks.shape)}")
    in_h, in_w = (int(v) for v in input_size)
    out_h, out_w = (int(v) for v in original_size)
    if not (0 < in_h <= image_size and 0 < in_w <= image_size):
        raise ValueError(f"input_size {(in_h, in_w)} does not fit in the {image_size}x{image_size} input")
    masks = F.interpolate(low_res_masks, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., :in_h, :in_w]
    return F.interpolate(masks, (out_h, out_w), mode="bilinear", align_corners=False)


class SamTransform:
    """
    SAM's input transform: resize the longest side to S, zero-pad to S x S (:meth:`preprocess`,
    on the CPU, uint8), then normalise inside the image, the padding exactly 0 (:meth:`normalize`,
    on the model's device). Together they give what the official ``Sam.preprocess`` gives; split
    so that the CPU does only the resize and a quarter of the bytes travel to the device (a
    1024x1024 input is 3 MB as uint8, 12.6 MB as float32).

    The resize is PIL's bilinear filter on the uint8 image (``Image.resize(..., BILINEAR)``):
    that is exactly what the official ``ResizeLongestSide.apply_image`` does (torchvision's
    ``resize`` on a PIL image calls PIL), so pixel values match the official SAM/LISA pipeline
    without needing torchvision; PIL's bilinear filter also antialiases when downscaling.

    Accepted images: HxWx3 uint8 RGB (numpy or PIL). HxW and HxWx1 grayscale are replicated to
    RGB; HxWx4 RGBA has its alpha channel dropped (not composited). Other dtypes raise TypeError,
    other shapes ValueError.

    Arguments:
      image_size (int): S, the model input side (1024 for official variants, 256 for tiny).
    """

    def __init__(self, image_size: int = 1024) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self._mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_sam(cls, sam: "Sam") -> "SamTransform":
        """The transform matching a built SAM's input size."""
        return cls(sam_image_size(sam))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"

    def resize(self, image: np.ndarray) -> np.ndarray:
        """
        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB (see the class docstring for other accepted forms).

        Returns:
          (np.ndarray): h x w x 3 uint8 RGB with max(h, w) == S.
        """
        image = as_rgb_uint8(image)
        new_h, new_w = get_preprocess_shape(image.shape[0], image.shape[1], self.image_size)
        if (new_h, new_w) == image.shape[:2]:
            return image
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))

    def preprocess(self, image: np.ndarray) -> SamInput:
        """
        Arguments:
          image (np.ndarray): HxWx3 uint8 RGB (see the class docstring for other accepted forms).

        Returns:
          (SamInput): pixel_values [3, S, S] uint8 (resized, zero-padded bottom/right; normalise
            with :meth:`normalize`), input_size (h, w), original_size (H, W).
        """
        image = as_rgb_uint8(image)
        original_size = (int(image.shape[0]), int(image.shape[1]))
        resized = self.resize(image)
        h, w = resized.shape[:2]
        x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).permute(2, 0, 1)
        x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return SamInput(pixel_values=x.contiguous(), input_size=(h, w), original_size=original_size)

    def normalize(self, pixel_values: torch.Tensor, input_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
        """
        Arguments:
          pixel_values (torch.Tensor): [B, 3, S, S] uint8 from :meth:`preprocess`, on any device.
          input_sizes: per image its (h, w) inside the S x S input.

        Returns:
          (torch.Tensor): [B, 3, S, S] float32 on the same device: (x - mean) / std inside each
            image, exactly 0 in the padding (the official ``Sam.preprocess``).
        """
        if pixel_values.dtype != torch.uint8:
            raise TypeError(f"SAM pixel values must be uint8 from SamTransform.preprocess, got {pixel_values.dtype}")
        if len(input_sizes) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(input_sizes)} input sizes")
        device = pixel_values.device
        x = (pixel_values.float() - self._mean.to(device)) / self._std.to(device)
        sizes = torch.tensor([[int(h), int(w)] for h, w in input_sizes], device=device).view(-1, 2, 1, 1)
        side = torch.arange(self.image_size, device=device)
        inside = (side.view(1, -1, 1) < sizes[:, 0]) & (side.view(1, 1, -1) < sizes[:, 1])  # [B, S, S]
        return torch.where(inside[:, None], x, 0.0)


# ---------------------------------------------------------------------------------------------
# Training setup
# ---------------------------------------------------------------------------------------------


def freeze_for_segmentation(sam: "Sam") -> None:
    """
    LISA's training setup: image encoder and prompt encoder frozen (requires_grad=False, eval
    mode), mask decoder trainable.

    ``nn.Module.train()`` recursively switches every submodule back to training mode, so the
    caller (the segmenter module that owns this SAM) must override ``train()`` to keep
    ``sam.image_encoder`` and ``sam.prompt_encoder`` in eval mode, and run the image encoder under
    ``torch.no_grad()`` (or inference mode) during training.

    Arguments:
      sam (Sam): modified in place.
    """
    for frozen in (sam.image_encoder, sam.prompt_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    sam.mask_decoder.requires_grad_(True)
