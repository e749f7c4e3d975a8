"""The segmenter's configuration, saved as ``config.json`` in Hugging Face style."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .constants import SEG_STATES

CONFIG_NAME = "config.json"
MODEL_TYPE = "qwen_vl_sam_segmenter"
# The rest of a segmenter directory (see :meth:`model.segmenter.ReasonSegmenter.save_pretrained`),
# named here so that model.loading checks a directory without importing the model (transformers).
VLM_DIR = "vlm"
ADAPTER_DIR = "adapter"
HEAD_WEIGHTS = "head.safetensors"
SAM_WEIGHTS = "sam.safetensors"


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a segmenter around its saved weights.

    Attributes:
        vlm_family: the Qwen-VL ``model_type`` (qwen2_vl, qwen2_5_vl, qwen3_vl).
        sam_variant: vit_b, vit_l, vit_h or tiny.
        hidden_size: the language model's hidden size H (input of the projection).
        prompt_dim: SAM's prompt embedding size P (output of the projection).
        vlm_path: where the VLM lives: a sub-directory of the checkpoint ("vlm") or, for a
            checkpoint holding only a LoRA adapter, the base model's directory or hub id.
        adapter_path: sub-directory with a peft LoRA adapter, or None for a full VLM.
        sam_checkpoint: the official SAM file, for directories that do not carry SAM's weights.
        lora: the LoRA settings the model was trained with (empty when none).
        train_language_model: the whole language model is trained instead of LoRA.
        ce_weight, bce_weight, dice_weight: loss weights (LISA's 1.0 / 2.0 / 0.5).
        answer_style: how the mask answers were worded in training (``"plain"``: LISA's
            templates, ``"named"``: the target named before its ``[SEG]``, see
            :data:`constants.ANSWER_STYLES`); test.py feeds teacher-forced answers in this
            style. A config.json written before it existed loads as ``"plain"``.
        seg_state: which hidden state stands for a ``[SEG]`` (:data:`constants.SEG_STATES`):
            ``"seg_token"``, its own, or ``"preceding_token"``, the one that predicts it (LISA's).
            A config.json written before it existed loads as ``"seg_token"``.
    """

    vlm_family: str
    sam_variant: str
    hidden_size: int
    prompt_dim: int
    vlm_path: str = VLM_DIR
    adapter_path: str | None = None
    sam_checkpoint: str | None = None
    lora: dict = field(default_factory=dict)
    train_language_model: bool = False
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    answer_style: str = "plain"
    seg_state: str = "seg_token"

    def __post_init__(self) -> None:
        if self.seg_state not in SEG_STATES:
            raise ValueError(f"seg_state must be one of {', '.join(SEG_STATES)}, got {self.seg_state!r}")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"model_type": MODEL_TYPE, **asdict(self)}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SegmenterConfig":
        """The config of a segmenter directory. Keys it does not know are ignored: e.g.
        ``seg_token``, which older versions wrote (the token is always :data:`constants.SEG_TOKEN`)."""
        file = Path(directory) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: {directory} is not a segmenter directory")
        payload = json.loads(file.read_text(encoding="utf-8"))
        if payload.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{file} has model_type {payload.get('model_type')!r}, not {MODEL_TYPE!r}: "
                "it is not a segmenter directory (a plain Qwen-VL directory needs --vision_pretrained too)"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})

    @staticmethod
    def is_segmenter_directory(directory: str | os.PathLike) -> bool:
        file = Path(directory) / CONFIG_NAME
        if not file.is_file():
            return False
        return json.loads(file.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
