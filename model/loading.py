"""Finding and loading a segmenter for the tools (inference.py, the demo, transform_weight.py).

``--version DIR`` names either

* a segmenter directory written by :meth:`ReasonSegmenter.save_pretrained`: a standalone one
  (``vlm/`` + ``sam.safetensors``, e.g. the output of transform_weight.py) or a training
  checkpoint (``adapter/`` referring to the base Qwen-VL, and the official SAM file by path;
  ``--base_model`` / ``--vision_pretrained`` override those two paths), or
* a training run directory holding ``checkpoint-*/`` sub-directories: the one named by its
  ``latest`` file (else the highest complete step, as the trainer resumes) is used, or the one
  its ``best`` file or link names with ``pick="best"``, and the choice is logged (see
  :mod:`utils.checkpoint`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from utils import checkpoint as ckpt
from utils.mixed_precision import PRECISIONS

from .config import MODEL_TYPE, SAM_WEIGHTS, SegmenterConfig
from .image_tokens import apply_pixel_limits

logger = logging.getLogger(__name__)

# Files of raw (not gathered) DeepSpeed ZeRO checkpoints.
_DEEPSPEED_PATTERNS = ("global_step*", "*zero_pp_rank_*", "mp_rank_*_model_states.pt", "zero_to_fp32.py")


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says why and what to pass instead."""


def resolve_checkpoint(path: str | os.PathLike, pick: str = "latest") -> Path:
    """The segmenter directory that ``path`` stands for (itself, or a checkpoint of a run).

    Args:
        path: a segmenter directory or a run directory with ``checkpoint-*/`` sub-directories.
        pick: in a run directory, "latest" (what its ``latest`` file names, else the highest
            complete checkpoint, as :func:`utils.checkpoint.latest_checkpoint`) or "best" (what
            its ``best`` file or link names).
    Raises:
        ModelLoadError: the path does not exist or holds no segmenter checkpoint, or its
            ``latest`` / ``best`` names something that is not one.
    """
    if pick not in ("latest", "best"):
        raise ValueError(f"pick must be 'latest' or 'best', got {pick!r}")
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model directory")
    if SegmenterConfig.is_segmenter_directory(path):
        return path
    pointer = ckpt.BEST_FILE if pick == "best" else ckpt.LATEST_FILE
    # What the entry names is taken even where the trainer would not resume from it (no
    # trainer_state.json): loading needs a segmenter directory, nothing more, and says if it is not.
    chosen = ckpt.named_checkpoint(path, pointer)
    if chosen is not None:
        how = f" (named by its '{pointer}' {'file' if (path / pointer).is_file() else 'link'})"
        if not SegmenterConfig.is_segmenter_directory(chosen):
            raise ModelLoadError(f"{path / pointer} names {chosen}, which is not a segmenter checkpoint directory")
    elif pick == "best":
        raise ModelLoadError(f"{path} has no 'best' link or file naming a checkpoint")
    else:
        checkpoints = ckpt.list_checkpoints(path)
        if not checkpoints:
            raise ModelLoadError(_not_a_checkpoint_message(path))
        chosen, how = checkpoints[-1], f", the highest of {len(checkpoints)} checkpoints (no 'latest' file)"
        if not SegmenterConfig.is_segmenter_directory(chosen):
            raise ModelLoadError(f"{chosen}, the highest checkpoint of {path}, is not a segmenter checkpoint directory")
    logger.info("%s is a run directory: using %s%s", path, chosen, how)
    return chosen


def _not_a_checkpoint_message(path: Path) -> str:
    message = (
        f"{path} is not a segmenter directory (no config.json with model_type "
        f"'{MODEL_TYPE}') and holds no complete checkpoint-*/ directories (with {ckpt.STATE_FILE})"
    )
    if any(next(path.glob(pattern), None) for pattern in _DEEPSPEED_PATTERNS):
        message += (
            ". It holds raw DeepSpeed ZeRO files: the trainer writes a gathered segmenter "
            "checkpoint (config.json, adapter/, head.safetensors) at every save; pass that directory"
        )
    elif (path / "config.json").is_file():
        message += (
            ". Its config.json is not a segmenter's (a plain Qwen-VL directory is a base model: "
            "pass it as --base_model with a training checkpoint)"
        )
    return message


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """``bf16``/``fp16``/``fp32``; ``None`` picks bf16 on CUDA (fp16 without bf16 support), fp32 on CPU."""
    if precision is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        logger.warning("fp16 on the CPU is slow; bf16 or fp32 are faster there")
    return PRECISIONS[precision]


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, device: torch.device, dtype: torch.dtype):
    """A bitsandbytes config for the language model, or None.

    Raises:
        ModelLoadError: both flags, no bitsandbytes, or no CUDA device (each says so).
    """
    if not (load_in_4bit or load_in_8bit):
        return None
    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    if load_in_4bit and load_in_8bit:
        raise ModelLoadError("choose one of --load_in_4bit and --load_in_8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"{flag} needs the bitsandbytes package, which is not installed: "
            "pip install bitsandbytes (on a machine with a CUDA GPU), or leave the flag out"
        )
    if device.type != "cuda":
        raise ModelLoadError(f"{flag} needs a CUDA GPU (bitsandbytes), but the device is {device}")
    from transformers import BitsAndBytesConfig

    # The vision tower and the LM head stay in full precision (as LISA does).
    skip = ["visual", "lm_head"]
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_segmenter(
    version: str | os.PathLike,
    *,
    precision: str | None = None,
    device: str | torch.device | None = None,
    base_model: str | os.PathLike | None = None,
    vision_pretrained: str | os.PathLike | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    pick: str = "latest",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Load a segmenter for inference (eval mode, on ``device``).

    Every weight is read straight into the run dtype on ``device`` (the VLM through
    transformers' ``device_map``, SAM from a memory-mapped file): there is no float32 copy of a
    bf16 model. All weights are in that dtype except SAM's prompt encoder (float32).

    Args:
        version: a segmenter directory or a training run directory (see the module doc).
        precision: bf16, fp16 or fp32 (None: bf16 on CUDA, fp32 on CPU).
        base_model, vision_pretrained: for a training checkpoint, the base Qwen-VL directory and
            the official SAM file, overriding the paths recorded in it.
        load_in_4bit, load_in_8bit: quantise the language model with bitsandbytes (CUDA only).
        min_pixels, max_pixels: the Qwen image processor's pixel limits (``--min_pixels`` /
            ``--max_pixels``); None: the checkpoint's saved values, the maximum capped at
            ``model.image_tokens.DEFAULT_MAX_IMAGE_TOKENS`` tokens (see
            :func:`model.image_tokens.apply_pixel_limits`).
    Raises:
        ModelLoadError: with a message naming what is missing or wrong.
    """
    from .segmenter import ReasonSegmenter

    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = resolve_precision(precision, device)
    quantization = quantization_config(load_in_4bit, load_in_8bit, device, dtype)
    directory = resolve_checkpoint(version, pick)
    config = SegmenterConfig.from_pretrained(directory)
    if not config.adapter_path and base_model:
        logger.warning("--base_model is ignored: %s carries its whole VLM", directory)
    if (directory / SAM_WEIGHTS).is_file() and vision_pretrained:
        logger.warning("--vision_pretrained is ignored: %s carries its SAM weights", directory)
    vlm_kwargs = {}
    if quantization is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        vlm_kwargs = {"quantization_config": quantization, "device_map": {"": index}}
    try:
        model = ReasonSegmenter.from_pretrained(
            directory, dtype=dtype, base_model=base_model, sam_checkpoint=vision_pretrained, device=device,
            **vlm_kwargs,
        )
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ModelLoadError(f"cannot load the model from {directory}: {err}") from err
    except ImportError as err:
        raise ModelLoadError(
            f"cannot load the model from {directory}: {err}. A training checkpoint (LoRA adapter) needs "
            "peft; a merged directory from transform_weight.py does not"
        ) from err
    try:
        apply_pixel_limits(model.processor, min_pixels, max_pixels)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err
    logger.info(
        "loaded %s (%s, %s%s) on %s", directory, config.vlm_family, str(dtype).removeprefix("torch."),
        ", 4-bit" if load_in_4bit else ", 8-bit" if load_in_8bit else "", device,
    )
    return model.eval()
