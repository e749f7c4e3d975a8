"""The vision-language model: loading Qwen-VL, the ``[SEG]`` token and LoRA.

Supported generations are chosen from the checkpoint config's ``model_type``; the processor is
the image-only one from :mod:`model.processor` (works without torchvision).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import (
    AutoConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from .constants import SEG_TOKEN
from .vision_attention import use_packed_vision_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLMFamily:
    model_class: type


#: The supported generations, by their checkpoints' ``model_type``.
VLM_FAMILIES = {
    "qwen2_vl": VLMFamily(Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": VLMFamily(Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": VLMFamily(Qwen3VLForConditionalGeneration),
}


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a model on the Hugging Face hub (``owner/name``) rather than a directory.

    Only a string ``owner/name`` that is no local path is: transformers then finds the model in
    the local hub cache (``HF_HUB_CACHE``; the only place it looks with ``HF_HUB_OFFLINE=1``) or
    downloads it. ``./name``, ``/abs/name`` or ``a/b/c`` are paths.
    """
    if not isinstance(path, str) or path.count("/") != 1 or Path(path).exists():
        return False
    try:
        validate_repo_id(path)  # also refuses a leading "." or "/"
    except HFValidationError:
        return False
    return True


def vlm_family(path_or_config) -> str:
    """``model_type`` of a checkpoint directory (or config), checked against the supported ones."""
    if isinstance(path_or_config, (str, os.PathLike)):
        path = Path(path_or_config)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        config = AutoConfig.from_pretrained(path_or_config)
    else:
        config = path_or_config
    model_type = getattr(config, "model_type", None)
    if model_type not in VLM_FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {path_or_config if isinstance(path_or_config, (str, os.PathLike)) else 'config'}; "
            f"supported: {', '.join(sorted(VLM_FAMILIES))} (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)"
        )
    return model_type


def text_hidden_size(config) -> int:
    """The language model's hidden size (``text_config.hidden_size``; the top level has none)."""
    return config.text_config.hidden_size


def load_vlm(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **kwargs,
) -> nn.Module:
    """Load a Qwen-VL model of any supported generation from a directory or hub id.

    The weights are read straight into ``dtype`` on ``device`` (``device_map={"": device}``):
    transformers builds the model without allocating weights and reads the safetensors shards
    into place, so no float32 copy is ever made for a bf16 run (on the CPU, a checkpoint already
    in ``dtype`` stays memory-mapped). ``device=None`` loads onto the CPU; a ``device_map`` in
    ``kwargs`` (e.g. with a quantisation config) wins over ``device``.
    """
    family = vlm_family(path)
    if device is not None and "device_map" not in kwargs:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": device}
    model = VLM_FAMILIES[family].model_class.from_pretrained(path, dtype=dtype, **kwargs)
    use_packed_vision_attention(model)  # the vision tower: one attention call per layer, not per window
    return model


def ensure_seg_token(model: nn.Module, tokenizer) -> int:
    """Register ``[SEG]`` as a special token and return its id.

    Qwen's embedding matrices have spare rows past the tokenizer's length (Qwen2.5-VL-7B: 152,064
    rows for 151,665 tokens); they are never shrunk. ``[SEG]`` takes the first id past the
    tokenizer, so with a published checkpoint it starts from one of those spare rows, as the
    checkpoint left it (never trained: its input embedding and LM-head row are learnt from there,
    both being trainable). Only when the tokenizer outgrows the matrices do they grow, and then
    the new rows start from the mean of the existing ones.
    """
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]}, replace_extra_special_tokens=False)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("grew the embedding matrices from %d to %d rows for %s", rows, len(tokenizer), SEG_TOKEN)
    return seg_id


#: The linear layers of a Qwen-VL language-model block (Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike).
LANGUAGE_MODEL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA on the language model's linear layers (never the vision tower)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def target_regex(self) -> str:
        """The language model's layers of ``target_modules``; ``all-linear`` (peft's name) is every
        linear layer of its blocks, never the vision tower's nor ``lm_head``."""
        modules = set(self.target_modules)
        if "all-linear" in modules:
            modules = (modules - {"all-linear"}) | set(LANGUAGE_MODEL_LINEARS)
        names = "|".join(sorted(modules))
        return rf".*language_model.*\.({names})$"


def parse_target_modules(text: str) -> list[str]:
    """``--lora_target_modules``: comma-separated layer names, spaces around them allowed
    (``"q_proj, v_proj"`` as typed), empty entries dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def apply_lora(model: nn.Module, settings: LoraSettings, seg_token_id: int):
    """Wrap ``model`` with peft LoRA; the ``[SEG]`` rows of the embedding and LM head train too.

    Only the ``[SEG]`` rows are trainable (peft ``trainable_token_indices``), not the whole
    matrices: for Qwen2.5-VL-7B that is 7 K parameters instead of about 1.09 B. Their forward is
    row-sparse (:mod:`model.seg_rows`): peft's own rebuilds each whole matrix on every call.
    """
    from peft import LoraConfig, get_peft_model

    from .seg_rows import use_row_sparse_trainable_tokens

    token_indices = {"embed_tokens": [seg_token_id]}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        token_indices["lm_head"] = [seg_token_id]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        trainable_token_indices=token_indices,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    use_row_sparse_trainable_tokens(peft_model)
    wrapped_vision = [n for n, _ in peft_model.named_modules() if "visual" in n and "lora_" in n]
    if wrapped_vision:
        raise RuntimeError(f"LoRA reached the vision tower ({wrapped_vision[0]}); check the target modules")
    return peft_model


def make_language_model_trainable(model: nn.Module) -> None:
    """Train the whole language model (for small models): everything but the vision tower."""
    for name, param in model.named_parameters():
        param.requires_grad = "visual" not in name


def make_trainable(
    model: nn.Module, lora: LoraSettings | None, train_language_model: bool, seg_token_id: int
) -> nn.Module:
    """Freeze ``model``, then make trainable what trains: its whole language model
    (``train_language_model``), else a LoRA with the ``[SEG]`` rows (``lora``; ``model`` is wrapped,
    see :func:`apply_lora`), else nothing. Returns the model, wrapped or not."""
    model.requires_grad_(False)
    if train_language_model:
        make_language_model_trainable(model)
    elif lora is not None:
        model = apply_lora(model, lora, seg_token_id)
    return model
