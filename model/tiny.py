"""Tiny random Qwen-VL models of each generation, built offline.

Used by the tests and by the built-in default (``make demo``). A tiny model is a real Hugging Face
checkpoint directory: a byte-level BPE tokenizer trained here on a few hundred sentences with Qwen's
special tokens and ``[SEG]``, Qwen's chat-template format, a real image processor and a randomly
initialised model of the real class, saved with ``save_pretrained``. Everything downstream loads
it through the same code paths as a 7B checkpoint.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .constants import SEG_TOKEN
from .processor import PROCESSOR_CLASSES, save_processor
from .vlm import VLM_FAMILIES

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's chat format (the image placeholder expanded by the processor); Qwen2 and Qwen2.5 add a
# default system prompt, Qwen3 does not.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"],
    "shape": ["circle", "square", "triangle", "star", "ellipse", "rectangle", "shape", "object", "thing"],
    "place": ["left", "right", "top", "bottom", "middle", "above", "below", "next to", "near"],
    "size": ["largest", "smallest", "big", "small", "large", "tiny"],
}
_SENTENCES = [
    "Can you segment the {c} {s} in this image?",
    "Please segment the {z} {c} {s}.",
    "What is {p} of the {c} {s}? Please output segmentation mask.",
    "Where is the {c} {s}? Please respond with segmentation mask.",
    "Sure, it is [SEG].",
    "It is [SEG].",
    "Sure, [SEG] and [SEG].",
    "The {z} {s} is {c}, [SEG].",
    "How many {s}s are there in the picture?",
    "There are {n} {s}s in the image.",
    "The {c} {s} is on the {p} because it is round and {z}.",
    "Which object would you pick up if you wanted the round thing?",
    "You are a helpful assistant.",
    "There is no such object in the image.",
]


def _training_corpus() -> list[str]:
    """A few hundred sentences covering the templates and the synthetic scenes' vocabulary."""
    corpus = []
    combos = itertools.product(_WORDS["colour"], _WORDS["shape"], _WORDS["place"], _WORDS["size"])
    for i, (c, s, p, z) in enumerate(combos):
        if i % 7:
            continue
        template = _SENTENCES[i % len(_SENTENCES)]
        corpus.append(template.format(c=c, s=s, p=p, z=z, n=i % 5 + 1))
    corpus.extend(_SENTENCES)
    return corpus


def build_tiny_tokenizer(vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's special tokens, ``[SEG]`` and Qwen's chat format."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[SEG_TOKEN],
    )
    return tokenizer


def chat_template(family: str) -> str:
    default_system = "true" if family in ("qwen2_vl", "qwen2_5_vl") else "false"
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", default_system)


def _tiny_config(family: str, vocab_size: int, token_ids: dict[str, int], hidden_size: int, num_layers: int):
    heads = 4
    head_dim = hidden_size // heads
    # mrope splits the rotary half-dimension over (temporal, height, width).
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )
    ids = dict(
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
    )
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, patch_size=14, spatial_merge_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
            patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
            patch_size=16, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown family {family!r}; supported: {sorted(VLM_FAMILIES)}")


def build_tiny_vlm(family: str = "qwen2_5_vl", hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """Build a tiny random Qwen-VL model and its processor (in memory).

    The embedding matrix has spare rows beyond the tokenizer, as Qwen's real checkpoints do.

    Returns:
        (model, processor)
    """
    tokenizer = build_tiny_tokenizer()
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) // 64 + 1) * 64
    config = _tiny_config(family, vocab_size, token_ids, hidden_size, num_layers)
    torch.manual_seed(seed)
    model = VLM_FAMILIES[family].model_class(config)
    patch = 16 if family == "qwen3_vl" else 14
    merge = 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        # A small pixel budget keeps the image to a few dozen tokens.
        min_pixels=(patch * merge) ** 2 * 4,
        max_pixels=(patch * merge) ** 2 * 36,
    )
    processor = PROCESSOR_CLASSES[family](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(family)
    )
    return model, processor


def save_tiny_vlm(out_dir: str | os.PathLike, family: str = "qwen2_5_vl", **kwargs) -> Path:
    """Build a tiny Qwen-VL and save it as a Hugging Face model directory."""
    out_dir = Path(out_dir)
    model, processor = build_tiny_vlm(family, **kwargs)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir, family)
    return out_dir


def make_tiny_segmenter(
    out_dir: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0, **vlm_kwargs
) -> Path:
    """Write a complete tiny segmenter directory (tiny Qwen-VL + tiny SAM + projection).

    The result loads with ``ReasonSegmenter.from_pretrained`` and as ``--version DIR`` in every
    entry point.
    """
    import tempfile

    from .segmenter import ReasonSegmenter

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        vlm_dir = save_tiny_vlm(Path(scratch) / "vlm", family, seed=seed, **vlm_kwargs)
        torch.manual_seed(seed)
        model = ReasonSegmenter.from_components(vlm_dir, sam_variant="tiny")
        model.save_pretrained(out_dir)
    return out_dir
