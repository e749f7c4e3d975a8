"""Image-only Qwen-VL processors that need no torchvision.

The stock Qwen-VL processors carry a video processor, and both their video processor and their
default (fast) image processor import torchvision. This project only feeds still images, so it
builds the processor from three parts that never touch torchvision:

* the checkpoint's tokenizer (``AutoTokenizer``),
* ``Qwen2VLImageProcessorPil`` reading the checkpoint's ``preprocessor_config.json``
  (Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use this image processor family; the file carries the
  family's patch size, merge size, normalisation and pixel budget; the entry points bound that
  budget with :mod:`model.image_tokens`),
* an image-only subclass of the family's processor class, whose ``__init__`` takes no video
  processor, so ``ProcessorMixin`` does not ask for one.

The result behaves like the stock processor for images and text (it returns ``mm_token_type_ids``,
which the models require) whether or not torchvision is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

logger = logging.getLogger(__name__)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}

# The stock class each image-only class stands for; written into processor_config.json so that
# other tools (with torchvision) open our directories with ``AutoProcessor``.
STOCK_PROCESSOR_NAMES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def _read_chat_template(path: Path) -> str | None:
    """Chat template from a checkpoint directory, in any of the places transformers writes it."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        file = path / name
        if file.is_file():
            template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template
    return None


def load_processor(path: str | os.PathLike, family: str):
    """Load an image-only processor for ``family`` from a Qwen-VL checkpoint directory.

    Args:
        path: directory holding the tokenizer files and ``preprocessor_config.json``.
        family: one of ``PROCESSOR_CLASSES`` (the config's ``model_type``).
    """
    if family not in PROCESSOR_CLASSES:
        raise ValueError(f"unsupported model family {family!r}; supported: {sorted(PROCESSOR_CLASSES)}")
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    chat_template = _read_chat_template(path) or getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        raise ValueError(f"{path} has no chat template (chat_template.jinja or in tokenizer_config.json)")
    return PROCESSOR_CLASSES[family](image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def save_processor(processor, path: str | os.PathLike, family: str) -> None:
    """Save ``processor`` so that both ``load_processor`` and stock ``AutoProcessor`` can read it."""
    path = Path(path)
    processor.save_pretrained(path)
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["processor_class"] = STOCK_PROCESSOR_NAMES[family]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
