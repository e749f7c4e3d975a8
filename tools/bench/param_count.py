"""Parameter and optimiser-memory accounting for real-size models, without any weights.

The published Qwen-VL configurations are written below as data. :func:`count_parameters` builds
the real model classes on the ``meta`` device (shapes only: no memory, no download, well under a
second per model), sets up trainability with the project's own code -- ``apply_lora`` /
``make_language_model_trainable`` from :mod:`model.vlm`, ``build_sam`` from :mod:`model.sam` and
the :class:`~model.segmenter.ReasonSegmenter` constructor (projection, SAM freezing, frozen IoU
head) -- and counts what is trainable.

Two recipes:

* ``ours``: LoRA on the language model + the ``[SEG]`` rows of ``embed_tokens`` (and of
  ``lm_head`` when it is untied) through peft ``trainable_token_indices`` + the projection + SAM's
  mask decoder without its IoU head (or, with ``train_language_model``, the whole language model
  instead of LoRA, as :meth:`ReasonSegmenter.from_components` does).
* ``lisa``: the published LISA / VLMSAM recipe, for comparison: the same LoRA, but the *whole*
  ``embed_tokens`` and ``lm_head`` matrices trainable, the projection and the whole mask decoder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from model.sam import SAM_VARIANTS
from model.vlm import VLM_FAMILIES, LoraSettings

RECIPES = ("ours", "lisa")

# Bytes per trainable parameter of the training state (mixed precision with AdamW).
ADAMW_BYTES_PER_PARAM = 8  # two fp32 moments (exp_avg, exp_avg_sq)
FP32_BYTES = 4

GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# Published configurations (config.json of the Hugging Face checkpoints)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLMSpec:
    """The parameter-relevant numbers of one published Qwen-VL checkpoint.

    Attributes:
        hf_id: the Hugging Face hub id the numbers come from.
        family: ``model_type`` (a key of :data:`model.vlm.VLM_FAMILIES`).
        text: ``text_config`` fields (hidden size, layers, heads, KV heads, intermediate, vocab,
            head_dim where the config states it, rope settings).
        vision: ``vision_config`` fields.
        tie_word_embeddings: whether ``lm_head`` shares ``embed_tokens``' weight.
        tokenizer_length: ``len(tokenizer)`` of the published tokenizer; ``[SEG]``, added as a
            special token, gets this id (it fits in the spare rows: no resize).
    """

    hf_id: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any]
    tie_word_embeddings: bool
    tokenizer_length: int

    @property
    def hidden_size(self) -> int:
        return self.text["hidden_size"]

    @property
    def head_dim(self) -> int:
        return self.text.get("head_dim", self.text["hidden_size"] // self.text["num_attention_heads"])


_QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

# Qwen2-VL vision tower (Qwen/Qwen2-VL-{2B,7B}-Instruct config.json): embed_dim 1280, depth 32,
# mlp_ratio 4, 16 heads, patch 14; ``hidden_size`` is the merger's output (= text hidden size).
_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2)
# Qwen2.5-VL vision tower (Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json).
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
# Qwen3-VL vision towers (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json): patch 16, a learned
# 48x48 position table (num_position_embeddings 2304) and DeepStack mergers.
_QWEN3_VISION_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
_QWEN3_VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                        patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                        num_position_embeddings=2304,
                        # [8, 16, 24]: qwen3vl.vision.deepstack_visual_indexes of the GGUF export of
                        # Qwen3-VL-8B-Instruct (https://ollama.com/library/qwen3-vl:8b-instruct-bf16),
                        # also the default of Megatron-Bridge's Qwen3-VL config. Only the number of
                        # indexes (3 mergers) affects the parameter count.
                        deepstack_visual_indexes=[8, 16, 24])

VLM_SPECS: dict[str, VLMSpec] = {
    "qwen2-vl-2b": VLMSpec(
        hf_id="Qwen/Qwen2-VL-2B-Instruct",
        family="qwen2_vl",
        text=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                  rope_parameters=_QWEN2_ROPE),
        vision=dict(_QWEN2_VISION, hidden_size=1536),
        tie_word_embeddings=True,
        tokenizer_length=151657,
    ),
    "qwen2-vl-7b": VLMSpec(
        hf_id="Qwen/Qwen2-VL-7B-Instruct",
        family="qwen2_vl",
        text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
                  rope_parameters=_QWEN2_ROPE),
        vision=dict(_QWEN2_VISION, hidden_size=3584),
        tie_word_embeddings=False,
        tokenizer_length=151657,
    ),
    "qwen2.5-vl-3b": VLMSpec(
        hf_id="Qwen/Qwen2.5-VL-3B-Instruct",
        family="qwen2_5_vl",
        text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000,
                  rope_parameters=_QWEN2_ROPE),
        vision=dict(_QWEN25_VISION, out_hidden_size=2048),
        tie_word_embeddings=True,
        tokenizer_length=151665,
    ),
    "qwen2.5-vl-7b": VLMSpec(
        hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
        family="qwen2_5_vl",
        text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
                  rope_parameters=_QWEN2_ROPE),
        vision=dict(_QWEN25_VISION, out_hidden_size=3584),
        tie_word_embeddings=False,
        tokenizer_length=151665,
    ),
    "qwen3-vl-2b": VLMSpec(
        hf_id="Qwen/Qwen3-VL-2B-Instruct",
        family="qwen3_vl",
        text=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=6144, vocab_size=151936, max_position_embeddings=262144,
                  rope_parameters=_QWEN3_ROPE),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2048),
        tie_word_embeddings=True,
        tokenizer_length=151669,
    ),
    "qwen3-vl-4b": VLMSpec(
        hf_id="Qwen/Qwen3-VL-4B-Instruct",
        family="qwen3_vl",
        text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=9728, vocab_size=151936, max_position_embeddings=262144,
                  rope_parameters=_QWEN3_ROPE),
        vision=dict(_QWEN3_VISION_SMALL, out_hidden_size=2560),
        tie_word_embeddings=True,
        tokenizer_length=151669,
    ),
    "qwen3-vl-8b": VLMSpec(
        hf_id="Qwen/Qwen3-VL-8B-Instruct",
        family="qwen3_vl",
        text=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=12288, vocab_size=151936, max_position_embeddings=262144,
                  rope_parameters=_QWEN3_ROPE),
        vision=dict(_QWEN3_VISION_8B, out_hidden_size=4096),
        tie_word_embeddings=False,
        tokenizer_length=151669,
    ),
}


def tiny_spec() -> VLMSpec:
    """A tiny Qwen2.5-VL of the real class (hidden 64, 2 layers), standing in for a published
    configuration where the real-size code paths run on a CPU (the benchmark's and
    ``tools/gpu_check.py``'s ``tiny`` modes)."""
    hidden, heads = 64, 4
    half = hidden // heads // 2
    return VLMSpec(
        hf_id="tiny/Qwen2.5-VL-tiny",
        family="qwen2_5_vl",
        text=dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1024, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                    fullatt_block_indexes=[1], in_channels=3),
        tie_word_embeddings=False,
        tokenizer_length=0,
    )


def resolve_model_name(name: str) -> str:
    """A key of :data:`VLM_SPECS` for ``name`` (also accepts hub ids such as
    ``Qwen/Qwen2.5-VL-7B-Instruct``); a clear error listing the valid names otherwise."""
    key = name.strip().lower()
    if key.startswith("qwen/"):
        key = key[len("qwen/"):]
    if key.endswith("-instruct"):
        key = key[: -len("-instruct")]
    key = key.replace("_", "-")
    if key not in VLM_SPECS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(VLM_SPECS)}")
    return key


def build_vlm_config(spec: VLMSpec, text_overrides: dict[str, Any] | None = None, **top_level):
    """The transformers config of a published checkpoint, from :class:`VLMSpec` numbers.

    Args:
        text_overrides: ``text_config`` fields to replace (e.g. the bos/eos/pad ids of another tokenizer).
        top_level: top-level fields (e.g. ``image_token_id`` of another tokenizer).
    """
    model_class = VLM_FAMILIES[spec.family].model_class
    text = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.text.items()}
    text.update(text_overrides or {})
    vision = {k: (list(v) if isinstance(v, list) else v) for k, v in spec.vision.items()}
    return model_class.config_class(
        text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_word_embeddings, **top_level
    )


def build_meta_vlm(spec: VLMSpec) -> nn.Module:
    """The real-size model class on the ``meta`` device (shapes only)."""
    config = build_vlm_config(spec)
    with torch.device("meta"):
        model = VLM_FAMILIES[spec.family].model_class(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != spec.tie_word_embeddings:
        raise RuntimeError(f"{spec.hf_id}: expected tie_word_embeddings={spec.tie_word_embeddings}, got {tied}")
    return model


# ---------------------------------------------------------------------------------------------
# Analytic formulas (cross-checks)
# ---------------------------------------------------------------------------------------------


def language_linear_shapes(spec: VLMSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the language model's per-layer linear layers."""
    h, i, hd = spec.hidden_size, spec.text["intermediate_size"], spec.head_dim
    heads, kv = spec.text["num_attention_heads"], spec.text["num_key_value_heads"]
    return {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def analytic_lora_params(spec: VLMSpec, settings: LoraSettings) -> int:
    """LoRA parameters: layers * r * sum(in + out) over the targeted language-model linears."""
    shapes = language_linear_shapes(spec)
    unknown = sorted(set(settings.target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"no analytic shape for target modules {unknown}; known: {', '.join(shapes)}")
    per_layer = sum(sum(shapes[name]) for name in set(settings.target_modules))
    return spec.text["num_hidden_layers"] * settings.r * per_layer


def analytic_seg_row_params(spec: VLMSpec) -> int:
    """One ``[SEG]`` row of H values per matrix: embed_tokens, plus lm_head when untied."""
    return spec.hidden_size * (1 if spec.tie_word_embeddings else 2)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    segmenter: nn.Module
    seg_rows_method: str
    notes: list[str] = field(default_factory=list)


class _StubTokenizer:
    def __init__(self, seg_id: int) -> None:
        self.seg_id = seg_id

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.seg_id


class _StubProcessor:
    """Just enough of a processor for :class:`ReasonSegmenter`'s constructor (it looks up the
    ``[SEG]`` id); nothing is tokenised here."""

    def __init__(self, seg_id: int) -> None:
        self.tokenizer = _StubTokenizer(seg_id)


def _plain_lora(vlm: nn.Module, settings: LoraSettings) -> nn.Module:
    """LoRA with the project's target selection but no ``trainable_token_indices``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        bias="none",
    )
    return get_peft_model(vlm, config)


def _setup(
    spec: VLMSpec, sam_variant: str, recipe: str, lora: LoraSettings, train_language_model: bool
) -> _Setup:
    from model.config import SegmenterConfig
    from model.sam import build_sam, sam_prompt_embed_dim
    from model.segmenter import ReasonSegmenter
    from model.vlm import apply_lora, make_language_model_trainable

    seg_id = spec.tokenizer_length  # [SEG] appended to the published tokenizer
    if seg_id >= spec.text["vocab_size"]:
        raise RuntimeError(f"{spec.hf_id}: [SEG] id {seg_id} does not fit the {spec.text['vocab_size']} rows")
    notes: list[str] = []
    seg_rows_method = ""
    vlm = build_meta_vlm(spec)
    vlm.requires_grad_(False)  # as ReasonSegmenter.from_components
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if recipe == "lisa":
            vlm = _plain_lora(vlm, lora)
            for module in (vlm.get_input_embeddings(), vlm.get_output_embeddings()):
                module.weight.requires_grad_(True)
            seg_rows_method = "n/a: the whole embed_tokens and lm_head train"
            notes.append("lisa recipe: LoRA + whole embed_tokens and lm_head + projection + whole mask decoder")
        elif train_language_model:
            make_language_model_trainable(vlm)
            seg_rows_method = "n/a: the whole language model trains"
            notes.append("whole language model trained (make_language_model_trainable), no LoRA")
        else:
            try:
                vlm = apply_lora(vlm, lora, seg_id)
                seg_rows_method = "peft trainable_token_indices (built on meta)"
            except Exception as err:  # pragma: no cover - peft versions that cannot work on meta
                vlm = _plain_lora(vlm, lora)
                seg_rows_method = "analytic"
                notes.append(f"peft trainable_token_indices failed on meta ({err!r}); [SEG] rows counted analytically")
        with torch.device("meta"):
            sam = build_sam(sam_variant)
            config = SegmenterConfig(
                vlm_family=spec.family,
                sam_variant=sam_variant,
                hidden_size=spec.hidden_size,
                prompt_dim=sam_prompt_embed_dim(sam),
            )
            segmenter = ReasonSegmenter(config, vlm, _StubProcessor(seg_id), sam)
    if recipe == "lisa":
        segmenter.sam.mask_decoder.requires_grad_(True)  # LISA trains the IoU head too
    if seg_rows_method == "analytic":
        notes.append(f"[SEG] rows: {analytic_seg_row_params(spec)} (H per matrix)")
    return _Setup(segmenter, seg_rows_method, notes)


def _vlm_part(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "trainable_tokens_delta" in name:
        return "seg_token_rows"
    if "visual" in name:
        return "vision_tower"
    if "embed_tokens" in name:
        return "embed_tokens"
    if "lm_head" in name:
        return "lm_head"
    return "language_model"


def count_parameters(
    model: str,
    sam_variant: str = "vit_h",
    recipe: str = "ours",
    lora: LoraSettings | None = None,
    train_language_model: bool = False,
) -> dict[str, Any]:
    """Total and trainable parameters, and the optimiser memory, of a real-size segmenter.

    Args:
        model: a key of :data:`VLM_SPECS` (or its hub id).
        sam_variant: vit_b, vit_l, vit_h (or tiny).
        recipe: "ours" or "lisa" (see the module docstring).
        lora: LoRA settings (default: :class:`LoraSettings`, i.e. LISA's r=8, alpha=16, q_proj/v_proj).
        train_language_model: train the whole language model instead of LoRA ("ours" only).

    Returns:
        A JSON-serialisable dict: ``total_params``, ``total_by_part``, ``trainable_params``,
        ``trainable_by_part``, ``adamw_state_bytes`` (two fp32 moments per trainable parameter),
        ``fp32_master_weight_bytes``, ``fp32_grad_bytes`` (4 bytes per trainable parameter each),
        ``bf16_weight_bytes`` (every parameter in bf16) and details.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    if recipe == "lisa" and train_language_model:
        raise ValueError("train_language_model applies to the 'ours' recipe only")
    key = resolve_model_name(model)
    spec = VLM_SPECS[key]
    if sam_variant not in SAM_VARIANTS:  # checked before any building
        raise ValueError(f"unknown SAM variant {sam_variant!r}; valid variants: {', '.join(SAM_VARIANTS)}")
    lora = lora if lora is not None else LoraSettings()
    setup = _setup(spec, sam_variant, recipe, lora, train_language_model)
    segmenter = setup.segmenter

    detail: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, param in segmenter.named_parameters():  # shared (tied) parameters appear once
        top = name.split(".", 1)[0]
        if top == "vlm":
            part = _vlm_part(name)
            detail_key = {"vision_tower": "vlm_vision", "lora": "vlm_adapters", "seg_token_rows": "vlm_adapters"}.get(
                part, "vlm_language"
            )
        elif top == "sam":
            part = name.split(".", 2)[1]  # image_encoder / prompt_encoder / mask_decoder
            detail_key = f"sam_{part}"
        elif top == "projection":
            part = detail_key = "projection"
        else:  # pragma: no cover - a new submodule of ReasonSegmenter
            part = detail_key = top
        detail[detail_key] = detail.get(detail_key, 0) + param.numel()
        if param.requires_grad:
            trainable[part] = trainable.get(part, 0) + param.numel()

    seg_rows_method = setup.seg_rows_method
    if seg_rows_method == "analytic":
        trainable["seg_token_rows"] = analytic_seg_row_params(spec)

    total_by_part = {
        "vlm": detail.get("vlm_vision", 0) + detail.get("vlm_language", 0),
        "sam": sum(v for k, v in detail.items() if k.startswith("sam_")),
        "projection": detail.get("projection", 0),
        "adapters": detail.get("vlm_adapters", 0),
    }
    total = sum(total_by_part.values())
    trainable_total = sum(trainable.values())
    order = ["lora", "seg_token_rows", "embed_tokens", "lm_head", "language_model", "vision_tower",
             "projection", "mask_decoder"]
    trainable_by_part = {k: trainable[k] for k in order if k in trainable}
    trainable_by_part.update({k: v for k, v in trainable.items() if k not in trainable_by_part})
    notes = list(setup.notes)
    if spec.tie_word_embeddings and "embed_tokens" in trainable_by_part:
        notes.append("tied embeddings: embed_tokens and lm_head are one matrix, counted once")
    lora_used = recipe == "lisa" or not train_language_model
    report: dict[str, Any] = {
        "model": key,
        "hf_id": spec.hf_id,
        "family": spec.family,
        "sam": sam_variant,
        "recipe": recipe,
        "train_language_model": train_language_model,
        "lora": (
            {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": list(lora.target_modules)}
            if lora_used else None
        ),
        "hidden_size": spec.hidden_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "seg_token_id": spec.tokenizer_length,
        "seg_token_rows_method": seg_rows_method,
        "total_params": total,
        "total_by_part": total_by_part,
        "total_detail": {k: detail[k] for k in sorted(detail)},
        "trainable_params": trainable_total,
        "trainable_by_part": trainable_by_part,
        "trainable_percent": round(100.0 * trainable_total / total, 4),
        "adamw_state_bytes": ADAMW_BYTES_PER_PARAM * trainable_total,
        "fp32_master_weight_bytes": FP32_BYTES * trainable_total,
        "fp32_grad_bytes": FP32_BYTES * trainable_total,
        "bf16_weight_bytes": 2 * total,
        "notes": notes,
    }
    if lora_used and "lora" in trainable_by_part:
        try:
            report["lora_params_analytic"] = analytic_lora_params(spec, lora)
        except ValueError:  # a target without a known analytic shape
            pass
    return report


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def human_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def markdown_table(sam_variant: str = "vit_h", lora: LoraSettings | None = None) -> str:
    """A markdown table over every model of :data:`VLM_SPECS`, for both recipes."""
    lora = lora if lora is not None else LoraSettings()
    header = (
        "| model | VLM params | SAM params | ours: trainable | ours: AdamW state | "
        "LISA recipe: trainable | LISA recipe: AdamW state | LISA / ours |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = [header]
    for key in VLM_SPECS:
        ours = count_parameters(key, sam_variant, "ours", lora)
        lisa = count_parameters(key, sam_variant, "lisa", lora)
        rows.append(
            f"| {key} | {human_count(ours['total_by_part']['vlm'])} | {human_count(ours['total_by_part']['sam'])} "
            f"| {human_count(ours['trainable_params'])} | {human_bytes(ours['adamw_state_bytes'])} "
            f"| {human_count(lisa['trainable_params'])} | {human_bytes(lisa['adamw_state_bytes'])} "
            f"| {lisa['trainable_params'] / ours['trainable_params']:.0f}x |"
        )
    caption = (
        f"SAM {sam_variant}; LoRA r={lora.r} on {', '.join(lora.target_modules)} of the language model in both "
        "recipes. Ours: LoRA + [SEG] rows (peft trainable_token_indices) + projection + mask decoder without "
        "its IoU head. LISA recipe: LoRA + whole embed_tokens and lm_head + projection + whole mask decoder. "
        "AdamW state = 2 fp32 moments (8 bytes) per trainable parameter."
    )
    return "\n".join(rows) + "\n\n" + caption
