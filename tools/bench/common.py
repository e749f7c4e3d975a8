"""Speed and memory, measured side by side with the published approach (LISA / VLMSAM).

``tools/benchmark.py`` is the command; the measurements live here. Every comparison runs both
sides in the same process on the same model and the same inputs, interleaved (the order flips
every repetition), and reports the medians. The published approach is reproduced *on our model*
by small functions in this module:

* :func:`published_generate` -- generation with ``use_cache=False``, then a second forward pass
  over the whole sequence to read the ``[SEG]`` states (what LISA and VLMSAM do), against
  :meth:`ReasonSegmenter.generate` (KV cache, ``[SEG]`` states gathered on the way).
* the same image asked about 5 times: every request re-encodes (no cache) against
  :class:`model.image_cache.FeatureCache` (SAM and Qwen vision features reused).
* 8 requests one at a time (a Python loop) against one left-padded batch.
* :func:`apply_published_training_recipe` -- LoRA with the *whole* ``embed_tokens`` and
  ``lm_head`` trainable, against our LoRA with the ``[SEG]`` rows only.

Whatever the random weights say, both sides are made to produce exactly the same tokens (a
scripted answer with ``[SEG]`` inside, forced by :class:`ScriptedAnswer`), and each row carries a
correctness check that both sides gave the same ``[SEG]`` states and masks (or losses).

Conventions of a :class:`BenchRow`: ``ours`` and ``baseline`` are medians of a quantity where
lower is better (seconds, milliseconds per sample, bytes...), so ``ratio = baseline / ours`` is
how many times faster (or smaller) ours is. Rows without a baseline (data loading, real-size
figures) have ``baseline = ratio = None``.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from model.batch import SampleEncoder, to_device, vlm_inputs
from model.config import SegmenterConfig
from model.image_tokens import DEFAULT_MAX_IMAGE_TOKENS
from model.segmenter import ReasonSegmenter, SegmentationResult
from model.vlm import LoraSettings, ensure_seg_token, text_hidden_size
from utils.distributed import free_port
from utils.masks import mask_to_box

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
MB = 1e6

#: Rows, in table order, by the name ``--only`` accepts.
BENCHMARKS = ("generation", "repeated_image", "batched", "training_step", "params", "ddp", "data_loading", "real_size")

#: The training log train_ddp.py writes in its run directory (utils.trainer.METRICS_FILE; not
#: imported from there, which would pull in DeepSpeed and its start-up messages).
METRICS_FILE = "metrics.jsonl"
#: The pixel limits this project's entry points give a Qwen2.5-VL checkpoint by default: Qwen's
#: shipped min_pixels (3,136 = 56x56) and the project's cap of 1,280 image tokens (1,003,520 =
#: 28x28x1280 pixels; the checkpoints themselves allow 12,845,056, see model/image_tokens.py).
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 28 * 28 * DEFAULT_MAX_IMAGE_TOKENS
#: Rows of Qwen2.5-VL-7B's embedding and LM head (the training-step row pads the tiny model to it).
QWEN25_7B_VOCAB = 152064

QUESTIONS = (
    "Where is the red circle?",
    "Can you segment the blue square in this image?",
    "Which shape would roll like a ball? Please output segmentation mask.",
    "Please segment the largest shape.",
    "What is on the left of the picture? Please respond with segmentation mask.",
    "Which object has the colour of a ripe tomato, and why would you pick it up first?",
    "Segment the star.",
    "Where is the green triangle near the middle of the image? Please output segmentation mask.",
)
FILLER = "The red circle is on the left because it is round and small, and the blue square is near the top. "


# ---------------------------------------------------------------------------------------------
# Settings, rows, timing
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What to run and how hard.

    Attributes:
        device: "cpu" or "cuda".
        quick: fewer repetitions (the whole table in a few minutes on a 2-core CPU).
        smoke: minimal sizes for tests (numbers meaningless, structure and checks real).
        hidden_size, num_layers: the tiny Qwen2.5-VL of the CPU table.
        threads: torch intra-op threads in this process (CPU).
        scratch: directory for generated files (JPEGs, synthetic root, training runs).
        real_size: "real" (Qwen2.5-VL-3B/7B + SAM ViT-H, needs CUDA), "tiny" (the same code path
            on a tiny configuration, for CPU checks) or "" (skip).
    """

    device: str = "cpu"
    quick: bool = False
    smoke: bool = False
    hidden_size: int = 256
    num_layers: int = 4
    threads: int = 1
    scratch: str = ""
    real_size: str = ""
    seed: int = 0

    @property
    def repeats(self) -> int:
        return 1 if self.smoke else 3 if self.quick else 7

    @property
    def token_counts(self) -> tuple[int, ...]:
        return (4, 8) if self.smoke else (32, 128)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class BenchRow:
    """One line of the table (see the module docstring for the conventions)."""

    name: str
    ours: float | None
    baseline: float | None
    unit: str
    goal: str
    met: bool | None = None
    check: str = ""
    check_passed: bool | None = None
    ours_is: str = ""
    baseline_is: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """``baseline / ours`` (None when either side is missing or ours is 0)."""
        if self.ours is None or self.baseline is None or self.ours == 0:
            return None
        return self.baseline / self.ours

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return {key: data[key] for key in ("name", "ours", "baseline", "unit", "ratio", "goal", "met", "check",
                                           "check_passed", "ours_is", "baseline_is", "details")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def interleaved(
    sides: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run each side ``warmup + repeats`` times, alternating the order every repetition.

    Returns:
        (per side the times of the timed repetitions, per side the result of its last call).
    """
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, Any] = {}
    for repetition in range(warmup + repeats):
        order = names if repetition % 2 == 0 else names[::-1]
        for name in order:
            seconds, last[name] = timed(sides[name], device)
            if repetition >= warmup:
                times[name].append(seconds)
    return times, last


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def build_segmenter(
    hidden_size: int = 256,
    num_layers: int = 4,
    sam_variant: str = "tiny",
    vocab_rows: int | None = None,
    seed: int = 0,
) -> ReasonSegmenter:
    """A tiny random Qwen2.5-VL (:func:`model.tiny.build_tiny_vlm`) + SAM + projection, in memory.

    The VLM is frozen and carries no LoRA (a merged model, as inference uses); call
    ``configure_training`` or :func:`apply_published_training_recipe` to train it. The same
    arguments give the same weights.

    Args:
        vocab_rows: grow the embedding and LM head to this many rows (new rows random), e.g.
            Qwen2.5-VL-7B's 152064, so that whole-matrix training has its real cost.
    """
    from model.sam import build_sam, sam_prompt_embed_dim
    from model.tiny import build_tiny_vlm

    vlm, processor = build_tiny_vlm("qwen2_5_vl", hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    if vocab_rows is not None and vocab_rows > vlm.get_input_embeddings().weight.shape[0]:
        torch.manual_seed(seed + 1)
        vlm.resize_token_embeddings(vocab_rows, mean_resizing=False)
    ensure_seg_token(vlm, processor.tokenizer)
    vlm.requires_grad_(False)
    torch.manual_seed(seed + 2)
    sam = build_sam(sam_variant)
    config = SegmenterConfig(
        vlm_family="qwen2_5_vl",
        sam_variant=sam_variant,
        hidden_size=text_hidden_size(vlm.config),
        prompt_dim=sam_prompt_embed_dim(sam),
    )
    torch.manual_seed(seed + 3)
    return ReasonSegmenter(config, vlm, processor, sam)


def apply_published_training_recipe(model: ReasonSegmenter, lora: LoraSettings | None = None) -> None:
    """LISA's / VLMSAM's trainable set on our model: LoRA on the same layers, the *whole*
    ``embed_tokens`` and ``lm_head`` matrices, the projection and the whole mask decoder
    (IoU head included). No ``trainable_token_indices``."""
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    model.vlm.requires_grad_(False)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_regex(), bias="none"
    )
    model.vlm = get_peft_model(model.vlm, config)
    for module in (model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()):
        module.weight.requires_grad_(True)
    model.sam.mask_decoder.requires_grad_(True)
    model.config.lora = dict(vars(lora))


def default_qwen25_processor():
    """An image-only Qwen2.5-VL processor with the limits the entry points use by default
    (min 56x56, max 28x28x1280 pixels: at most 1,280 image tokens) and the tiny tokenizer of
    :mod:`model.tiny`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from model.processor import PROCESSOR_CLASSES
    from model.tiny import build_tiny_tokenizer, chat_template

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=QWEN25_MIN_PIXELS, max_pixels=QWEN25_MAX_PIXELS
    )
    return PROCESSOR_CLASSES["qwen2_5_vl"](
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), chat_template=chat_template("qwen2_5_vl")
    )


def scene(seed: int, width: int = 640, height: int = 480) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A photo-like test image: a smooth random colour field, 2-3 filled shapes, sensor noise.

    Returns:
        (HxWx3 uint8 image, the shapes' polygons [k, 2] int32, their HxW uint8 masks).
    """
    import cv2

    from utils.data.synthetic import COLOURS, SHAPE_KINDS, shape_polygon

    rng = np.random.default_rng(seed)
    field_small = rng.uniform(60, 230, size=(6, 8, 3)).astype(np.float32)
    image = cv2.resize(field_small, (width, height), interpolation=cv2.INTER_CUBIC)
    polygons, masks = [], []
    colours = list(COLOURS.values())
    for index in range(int(rng.integers(2, 4))):
        radius = int(rng.integers(min(width, height) // 10, min(width, height) // 5))
        cx = int(rng.integers(radius, width - radius))
        cy = int(rng.integers(radius, height - radius))
        polygon = shape_polygon(SHAPE_KINDS[index % len(SHAPE_KINDS)], cx, cy, radius)
        cv2.fillPoly(image, [polygon], colours[int(rng.integers(len(colours)))])
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [polygon], 1)
        polygons.append(polygon)
        masks.append(mask)
    image = image + rng.normal(0, 6.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), polygons, masks


class ScriptedAnswer(LogitsProcessor):
    """Greedy decoding produces ``token_ids`` (then repeats the last one), whatever the weights."""

    def __init__(self, token_ids: Sequence[int], prompt_length: int) -> None:
        self.token_ids = list(token_ids)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = self.token_ids[min(step, len(self.token_ids) - 1)]
        out = torch.full_like(scores, torch.finfo(scores.dtype).min)
        out[:, forced] = 0
        return out


def answer_script(tokenizer, num_tokens: int, seg_token_id: int, num_seg: int = 2) -> list[int]:
    """``num_tokens + 1`` ids of plain text with ``num_seg`` ``[SEG]`` spread inside and no stop token.

    Generation keeps going for exactly ``num_tokens`` tokens (the extra id feeds the one decoding
    step :meth:`ReasonSegmenter.generate` runs past its limit).
    """
    filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    ids = [filler[i % len(filler)] for i in range(num_tokens + 1)]
    num_seg = min(num_seg, num_tokens)
    for k in range(num_seg):
        ids[(k + 1) * num_tokens // (num_seg + 1)] = seg_token_id
    return ids


def _scripted(model: ReasonSegmenter, batch: dict, ids: Sequence[int]) -> LogitsProcessorList:
    return LogitsProcessorList([ScriptedAnswer(ids, batch["input_ids"].shape[1])])




def request_batch(model: ReasonSegmenter, images: Sequence[np.ndarray], questions: Sequence[str]) -> dict:
    """A left-padded generation batch of one open question per image, on the model's device."""
    samples = [model.prepare(image, [(question, None)]) for image, question in zip(images, questions)]
    return to_device(model.collate(samples, padding_side="left"), model.device)


# ---------------------------------------------------------------------------------------------
# The published generation (baseline)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def published_generate(
    model: ReasonSegmenter, batch: dict, max_new_tokens: int = 64, **generate_kwargs
) -> list[SegmentationResult]:
    """LISA's / VLMSAM's inference on our model: greedy generation *without* the KV cache
    (``use_cache=False``: every step re-runs the whole sequence), then a second forward pass over
    prompt + answer to read the final hidden states at the ``[SEG]`` positions, then SAM."""
    inputs = vlm_inputs(batch)
    prompt_length = inputs["input_ids"].shape[1]
    sequences = model.vlm.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=False,
        pad_token_id=model.processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    generated = sequences[:, prompt_length:]
    full = dict(inputs)
    full["input_ids"] = sequences
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated)], dim=1)
    with model.hidden_states.capture() as captured:
        model.vlm(**full, use_cache=False)
    hidden = captured[-1]
    image_embeddings = model.encode_images(batch["sam_pixel_values"])
    stop_ids = model._stop_token_ids()
    results = []
    for index in range(len(generated)):
        tokens = generated[index].tolist()
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        tokens = tokens[:end]
        positions = [prompt_length + j for j, token in enumerate(tokens) if token == model.seg_token_id]
        result = SegmentationResult(
            text=model.processor.tokenizer.decode(tokens, skip_special_tokens=False), token_ids=tokens
        )
        if positions:
            states = hidden[index, positions]
            result.seg_states = states
            logits = model.decode_masks(
                image_embeddings[index], states, batch["sam_input_size"][index], batch["original_size"][index]
            )
            result.masks = [mask.cpu().numpy() for mask in logits > 0]
            result.boxes = [mask_to_box(mask) for mask in result.masks]
        results.append(result)
    return results


def compare_results(ours: Sequence[SegmentationResult], theirs: Sequence[SegmentationResult], atol: float) -> dict:
    """Same tokens, same ``[SEG]`` states (max abs difference <= atol) and the mask agreement."""
    same_tokens = len(ours) == len(theirs) and all(a.token_ids == b.token_ids for a, b in zip(ours, theirs))
    max_diff, pixels, agree, num_masks, num_seg = 0.0, 0, 0, 0, 0
    shapes_ok = True
    for a, b in zip(ours, theirs):
        if (a.seg_states is None) != (b.seg_states is None):
            shapes_ok = False
            continue
        if a.seg_states is None:
            continue
        if a.seg_states.shape != b.seg_states.shape:
            shapes_ok = False
            continue
        num_seg += len(a.seg_states)
        max_diff = max(max_diff, float((a.seg_states.float() - b.seg_states.float()).abs().max()))
        for ma, mb in zip(a.masks, b.masks):
            pixels += ma.size
            agree += int((ma == mb).sum())
            num_masks += 1
    agreement = agree / pixels if pixels else 1.0
    passed = bool(same_tokens and shapes_ok and num_seg > 0 and max_diff <= atol and agreement >= 0.999)
    text = (
        f"same tokens: {'yes' if same_tokens else 'NO'}; {num_seg} [SEG] states, max abs diff {max_diff:.1e} "
        f"(tol {atol:g}); mask pixels equal {100 * agreement:.2f}%"
    )
    return {"passed": passed, "text": text, "max_state_diff": max_diff, "mask_agreement": agreement,
            "same_tokens": same_tokens, "num_seg_states": num_seg}


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def bench_generation(settings: BenchSettings, model: ReasonSegmenter | None = None) -> list[BenchRow]:
    """One request, N new tokens: KV-cache generation vs ``use_cache=False`` + a second forward."""
    device = settings.torch_device
    model = model or build_segmenter(settings.hidden_size, settings.num_layers, "tiny", seed=settings.seed)
    model.to(device).eval()
    image, _, _ = scene(settings.seed + 10)
    batch = request_batch(model, [image], [QUESTIONS[2]])
    rows = []
    for num_tokens in settings.token_counts:
        ids = answer_script(model.processor.tokenizer, num_tokens, model.seg_token_id)
        times, last = interleaved(
            {
                "ours": lambda: model.generate(batch, num_tokens, logits_processor=_scripted(model, batch, ids)),
                "baseline": lambda: published_generate(model, batch, num_tokens, logits_processor=_scripted(model, batch, ids)),
            },
            settings.repeats,
            device,
        )
        check = compare_results(last["ours"], last["baseline"], atol=1e-4)
        check["passed"] = check["passed"] and len(last["ours"][0].token_ids) == num_tokens
        ours, baseline = median(times["ours"]), median(times["baseline"])
        goal_speedup = 3.0 if num_tokens >= 128 else None
        rows.append(
            BenchRow(
                name=f"one request, {num_tokens} new tokens",
                ours=ours,
                baseline=baseline,
                unit="s",
                goal=">= 3x faster" if goal_speedup else "(goal at 128 tokens)",
                met=(baseline / ours >= goal_speedup) if goal_speedup else None,
                check=check["text"],
                check_passed=check["passed"],
                ours_is="KV-cache generation, [SEG] states gathered on the way",
                baseline_is="generate(use_cache=False), then a second full forward for the [SEG] states",
                details={"times_ours": times["ours"], "times_baseline": times["baseline"],
                         "prompt_tokens": int(batch["input_ids"].shape[1]), "new_tokens": num_tokens,
                         "max_state_diff": check["max_state_diff"], "mask_agreement": check["mask_agreement"]},
            )
        )
    return rows


def bench_repeated_image(settings: BenchSettings, sam_variant: str | None = None) -> list[BenchRow]:
    """The same image asked about 5 times: features reused (FeatureCache) vs re-encoded every time.

    Requests alternate between the sides (ours 1, baseline 1, ours 2 ...); each round starts
    with an empty cache. Reported: the medians of requests 2-5, and request 1 in the details.
    """
    from model.image_cache import FeatureCache

    device = settings.torch_device
    sam_variant = sam_variant or ("tiny" if settings.smoke else "vit_b")
    model = build_segmenter(settings.hidden_size, settings.num_layers, sam_variant, seed=settings.seed)
    model.to(device).eval()
    image, _, _ = scene(settings.seed + 20)
    questions = QUESTIONS[:5]
    rounds = 1 if (settings.quick or settings.smoke) else 2
    answer = "Sure, it is [SEG]."
    tokenizer = model.processor.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    num_tokens = len(ids)
    ids = ids + ids[-1:]

    def request(question: str) -> SegmentationResult:
        batch = request_batch(model, [image], [question])
        return model.generate(batch, num_tokens, logits_processor=_scripted(model, batch, ids))[0]

    times: dict[str, list[list[float]]] = {"ours": [], "baseline": []}
    results: dict[str, list[SegmentationResult]] = {"ours": [], "baseline": []}
    stats = []
    for round_index in range(rounds):
        cache = FeatureCache(max_items=8)
        times["ours"].append([])
        times["baseline"].append([])
        results = {"ours": [], "baseline": []}
        for request_index, question in enumerate(questions):
            order = ("ours", "baseline") if (round_index + request_index) % 2 == 0 else ("baseline", "ours")
            for side in order:
                if side == "ours":
                    with cache.attached(model):
                        seconds, result = timed(lambda: request(question), device)
                else:
                    seconds, result = timed(lambda: request(question), device)
                times[side][-1].append(seconds)
                results[side].append(result)
        stats.append(dict(cache.stats))
    first = {side: median([r[0] for r in times[side]]) for side in times}
    later = {side: median([t for r in times[side] for t in r[1:]]) for side in times}
    check = compare_results(results["ours"], results["baseline"], atol=1e-5)
    expected_hits = len(questions) - 1
    cache_ok = all(s["sam_hits"] == expected_hits and s["vision_hits"] == expected_hits for s in stats)
    check["passed"] = check["passed"] and cache_ok
    speedup_vs_first = first["ours"] / later["ours"]
    sam_name = {"vit_b": "SAM ViT-B (real size, random weights, 1024x1024)"}.get(sam_variant, f"SAM {sam_variant}")
    sam_label = {"vit_b": "SAM ViT-B"}.get(sam_variant, f"SAM {sam_variant}")
    return [
        BenchRow(
            name=f"same image asked 5 times ({sam_label}): requests 2-5",
            ours=later["ours"],
            baseline=later["baseline"],
            unit="s",
            goal=f">= 5x faster than request 1 (ours: request 1 {first['ours']:.2f} s, {speedup_vs_first:.1f}x)",
            met=speedup_vs_first >= 5.0,
            check=check["text"] + f"; cache hits SAM {stats[-1]['sam_hits']}, vision {stats[-1]['vision_hits']} of {expected_hits}",
            check_passed=check["passed"],
            ours_is="image features reused (FeatureCache: SAM embedding and Qwen vision tower)",
            baseline_is="every request re-encodes the image",
            details={"sam": sam_name, "first_request_s": first, "requests_2_5_median_s": later,
                     "speedup_vs_first_ours": speedup_vs_first, "times_by_round": times, "cache_stats": stats,
                     "rounds": rounds, "new_tokens": num_tokens},
        )
    ]


def bench_batched(settings: BenchSettings, model: ReasonSegmenter | None = None, num_requests: int = 8) -> list[BenchRow]:
    """8 requests (8 images, 8 questions): one left-padded batch vs a loop of single requests."""
    device = settings.torch_device
    model = model or build_segmenter(settings.hidden_size, settings.num_layers, "tiny", seed=settings.seed)
    model.to(device).eval()
    images = [scene(settings.seed + 30 + i)[0] for i in range(num_requests)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(num_requests)]
    return [_bench_batched_once(settings, model, images, questions, n) for n in settings.token_counts]


def _bench_batched_once(settings: BenchSettings, model: ReasonSegmenter, images, questions, num_tokens: int) -> BenchRow:
    """One row of :func:`bench_batched`: ``num_tokens`` new tokens per request."""
    device = settings.torch_device
    num_requests = len(images)
    ids = answer_script(model.processor.tokenizer, num_tokens, model.seg_token_id)

    def batched() -> list[SegmentationResult]:
        batch = request_batch(model, images, questions)
        return model.generate(batch, num_tokens, logits_processor=_scripted(model, batch, ids))

    def one_at_a_time() -> list[SegmentationResult]:
        results = []
        for image, question in zip(images, questions):
            batch = request_batch(model, [image], [question])
            results.extend(model.generate(batch, num_tokens, logits_processor=_scripted(model, batch, ids)))
        return results

    times, last = interleaved({"ours": batched, "baseline": one_at_a_time}, settings.repeats, device)
    # Left padding changes the floating-point order of the attention sums a little.
    check = compare_results(last["ours"], last["baseline"], atol=1e-3)
    ours, baseline = median(times["ours"]), median(times["baseline"])
    return BenchRow(
        name=f"{num_requests} requests, {num_tokens} new tokens each",
        ours=ours,
        baseline=baseline,
        unit="s",
        goal=">= 2x the throughput",
        met=baseline / ours >= 2.0,
        check=check["text"],
        check_passed=check["passed"],
        ours_is="one left-padded batch",
        baseline_is="one request at a time",
        details={"times_ours": times["ours"], "times_baseline": times["baseline"],
                 "requests_per_second": {"ours": num_requests / ours, "baseline": num_requests / baseline},
                 "max_state_diff": check["max_state_diff"], "mask_agreement": check["mask_agreement"]},
    )


def training_batch(model: ReasonSegmenter, seed: int, batch_size: int = 2, turns: int = 3) -> dict:
    """``batch_size`` samples of ``turns`` segmentation questions each (LISA asks 3 per image)."""
    samples = []
    for index in range(batch_size):
        image, _, masks = scene(seed + 100 + index)
        conversation = [(QUESTIONS[(index + t) % len(QUESTIONS)], "Sure, it is [SEG].") for t in range(turns)]
        samples.append(model.prepare(image, conversation, [masks[t % len(masks)] for t in range(turns)]))
    return to_device(model.collate(samples, padding_side="right"), model.device)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the trainable parameters, their gradients and the optimizer's state tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    sizes = {
        "trainable_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
    }
    sizes["total_bytes"] = sizes["param_bytes"] + sizes["grad_bytes"] + sizes["optimizer_state_bytes"]
    return sizes


def _train_step(model: ReasonSegmenter, optimizer, batch: dict, autocast_dtype: torch.dtype | None = None) -> float:
    """forward, backward, gradient clipping (1.0), AdamW step, zero_grad -- as utils/trainer.py."""
    model.train()
    context = torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with context:
        output = model(batch)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(output.loss.detach())


def bench_training_step(settings: BenchSettings) -> list[BenchRow]:
    """A training step (batch 2, AdamW) with our trainable set vs LISA's (whole embed/lm_head)."""
    from utils.optim import build_optimizer

    device = settings.torch_device
    vocab_rows = 2048 if settings.smoke else QWEN25_7B_VOCAB
    models = {}
    for side in ("ours", "baseline"):
        model = build_segmenter(settings.hidden_size, settings.num_layers, "tiny", vocab_rows=vocab_rows, seed=settings.seed)
        if side == "ours":
            model.configure_training(LoraSettings())
        else:
            apply_published_training_recipe(model, LoraSettings())
        models[side] = model.to(device)
    batch = training_batch(models["ours"], settings.seed)
    # Same weights, same inputs: the same loss before training (eval mode: no LoRA dropout).
    with torch.no_grad():
        losses = {side: float(m.eval()(batch).loss) for side, m in models.items()}
    loss_diff = abs(losses["ours"] - losses["baseline"])
    optimizers = {side: build_optimizer(m, 3e-4, 0.0, (0.9, 0.95)) for side, m in models.items()}
    times, _ = interleaved(
        {side: (lambda s=side: _train_step(models[s], optimizers[s], batch)) for side in models},
        settings.repeats,
        device,
    )
    memory, peaks = {}, {}
    for side, model in models.items():
        # One more step, measured between backward and zero_grad (gradients alive, AdamW state allocated).
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        output = model(batch)
        output.loss.backward()
        optimizers[side].step()
        memory[side] = training_state_bytes(model, optimizers[side])
        optimizers[side].zero_grad(set_to_none=True)
        if device.type == "cuda":
            peaks[side] = torch.cuda.max_memory_allocated(device) - before
    trainable = {side: memory[side]["trainable_params"] for side in memory}
    check_text = (
        f"same weights and batch: loss before training {losses['ours']:.5f} vs {losses['baseline']:.5f} "
        f"(abs diff {loss_diff:.1e})"
    )
    common = dict(
        ours_is="LoRA + [SEG] rows only (peft trainable_token_indices)",
        baseline_is="LoRA + whole embed_tokens and lm_head trainable",
        check=check_text,
        check_passed=loss_diff <= 1e-4 * max(1.0, abs(losses["ours"])),
    )
    if peaks:
        rows_peak = [BenchRow(
            name="training step peak memory increase (torch.cuda.max_memory_allocated)",
            ours=peaks["ours"] / MB, baseline=peaks["baseline"] / MB, unit="MB", goal="report",
            details={"bytes": peaks}, **common,
        )]
    else:
        rows_peak = []
    model_text = (f"tiny Qwen2.5-VL hidden {settings.hidden_size}, {settings.num_layers} layers, "
                  f"{vocab_rows} vocabulary rows; SAM tiny; batch 2 x 3 questions")
    rows = [
        BenchRow(
            name=f"training step (batch 2, AdamW; {vocab_rows}-row embedding and LM head)",
            ours=median(times["ours"]),
            baseline=median(times["baseline"]),
            unit="s",
            goal="report",
            details={"times_ours": times["ours"], "times_baseline": times["baseline"], "model": model_text,
                     "trainable_params": trainable},
            **common,
        ),
        BenchRow(
            name="training state: trainable params + grads + AdamW moments",
            ours=memory["ours"]["total_bytes"] / MB,
            baseline=memory["baseline"]["total_bytes"] / MB,
            unit="MB",
            goal="report",
            details={"bytes": memory, "model": model_text},
            **common,
        ),
    ]
    return rows + rows_peak


def bench_params(settings: BenchSettings, model_name: str = "qwen2.5-vl-7b", sam_variant: str = "vit_h") -> list[BenchRow]:
    """Trainable parameters and AdamW state at real size (model.param_count, on the meta device)."""
    from model.param_count import count_parameters

    ours = count_parameters(model_name, sam_variant, "ours")
    lisa = count_parameters(model_name, sam_variant, "lisa")
    label = f"{ours['hf_id'].split('/')[-1].removesuffix('-Instruct')} + SAM {sam_variant.replace('vit_', 'ViT-').upper().replace('VIT', 'ViT')}"
    common = dict(ours_is="default LoRA (r=8, q_proj/v_proj) + [SEG] rows + projection + mask decoder",
                  baseline_is="LISA's recipe: the same LoRA + whole embed_tokens and lm_head + whole mask decoder",
                  check="counted on the meta device with the project's own set-up code", check_passed=True)
    return [
        BenchRow(
            name=f"trainable parameters, {label}",
            ours=ours["trainable_params"] / 1e6,
            baseline=lisa["trainable_params"] / 1e6,
            unit="M",
            goal="<= 40 M vs about 1.1 B",
            met=ours["trainable_params"] <= 40e6 and 1.0e9 <= lisa["trainable_params"] <= 1.2e9,
            details={"ours": ours["trainable_by_part"], "baseline": lisa["trainable_by_part"]},
            **common,
        ),
        BenchRow(
            name=f"AdamW state (2 fp32 moments), {label}",
            ours=ours["adamw_state_bytes"] / GB,
            baseline=lisa["adamw_state_bytes"] / GB,
            unit="GB",
            goal="report",
            details={"ours_bytes": ours["adamw_state_bytes"], "baseline_bytes": lisa["adamw_state_bytes"]},
            **common,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# DDP throughput (train_ddp.py under torchrun, as subprocesses)
# ---------------------------------------------------------------------------------------------


def ddp_inputs(scratch: Path, hidden_size: int, num_layers: int, num_train: int = 24) -> tuple[Path, Path, dict]:
    """A synthetic data root and a tiny segmenter directory under ``scratch`` (kept for reuse)."""
    from model.tiny import make_tiny_segmenter
    from utils.data.synthetic_writer import MARKER_FILE, write_synthetic_dataset

    data = scratch / "synthetic"
    if (data / MARKER_FILE).is_file():
        marker = json.loads((data / MARKER_FILE).read_text())
    else:
        marker = write_synthetic_dataset(str(data), seed=0, num_train=num_train, num_val=2, overwrite=True)
    model_dir = scratch / f"tiny_h{hidden_size}_l{num_layers}"
    if not (model_dir / "config.json").is_file():
        make_tiny_segmenter(model_dir, "qwen2_5_vl", hidden_size=hidden_size, num_layers=num_layers)
    return data, model_dir, marker["train_flags"]


def run_training(
    nproc: int, data: Path, model_dir: Path, flags: dict, run_dir: Path, steps: int, batch_size: int = 2
) -> list[dict]:
    """``torchrun --nproc_per_node nproc train_ddp.py`` on CPU (1 thread per process, no loader
    workers, no validation); returns the run's training records from metrics.jsonl."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "train_ddp.py", "--version", str(model_dir), "--dataset_dir", str(data),
        *[arg for key, value in flags.items() if key != "val_dataset" for arg in (f"--{key}", value)],
        "--workers", "0", "--batch_size", str(batch_size), "--grad_accumulation_steps", "1",
        "--epochs", "1", "--steps_per_epoch", str(steps), "--max_steps", str(steps), "--warmup_steps", "0",
        "--no_eval", "--save_steps", "1000000", "--log_base_dir", str(run_dir.parent), "--exp_name", run_dir.name,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training run failed ({' '.join(command)}):\n{tail}")
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("kind") == "train"]


def bench_ddp(settings: BenchSettings, scratch: Path) -> list[BenchRow]:
    """Training throughput of the small model, 2 processes vs 1 under torchrun (DDP, gloo, CPU)."""
    steps = 6 if settings.smoke else 12 if settings.quick else 30
    skip = 2 if settings.smoke else 4 if settings.quick else 6
    repeats = 1 if (settings.quick or settings.smoke) else 2
    data, model_dir, flags = ddp_inputs(scratch, settings.hidden_size, settings.num_layers)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for repetition in range(repeats):
        for nproc in ((1, 2) if repetition % 2 == 0 else (2, 1)):
            run_dir = scratch / "runs" / f"ddp_n{nproc}_r{repetition}_{os.getpid()}"
            records = run_training(nproc, data, model_dir, flags, run_dir, steps)
            rates[nproc].extend(r["samples_per_second"] for r in records[skip:])
    sps = {n: median(v) for n, v in rates.items()}
    ratio = sps[2] / sps[1]
    return [
        BenchRow(
            name="training throughput, 2 vs 1 processes (torchrun, 1 thread each)",
            ours=1000.0 / sps[2],
            baseline=1000.0 / sps[1],
            unit="ms/sample",
            goal=">= 1.6x samples per second",
            met=ratio >= 1.6,
            check=f"samples/s: 2 processes {sps[2]:.2f}, 1 process {sps[1]:.2f} (median of steps {skip + 1}-{steps})",
            check_passed=True,
            ours_is="DDP over 2 processes (gloo), samples of both ranks per second",
            baseline_is="1 process",
            details={"samples_per_second": {"1": sps[1], "2": sps[2]}, "steps": steps, "skipped_warmup_steps": skip,
                     "repeats": repeats, "model": f"tiny Qwen2.5-VL hidden {settings.hidden_size}, "
                     f"{settings.num_layers} layers + SAM tiny, default LoRA", "batch_size_per_process": 2,
                     "device": "CPU processes (CUDA_VISIBLE_DEVICES='')"},
        )
    ]


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------


def write_reason_seg_jpegs(root: Path, count: int, width: int = 640, height: int = 480) -> Path:
    """``count`` photo-like JPEGs (quality 90) in ReasonSeg's layout under ``root``."""
    from PIL import Image

    folder = root / "reason_seg" / "ReasonSeg" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image, polygons, _ = scene(1000 + index, width, height)
        Image.fromarray(image).save(folder / f"img_{index:03d}.jpg", quality=90)
        annotation = {
            "text": ["the shape that could roll like a ball", "Which object would you pick up first?",
                     "the largest shape in the picture"],
            "is_sentence": False,
            "shapes": [{"label": "target", "points": polygons[0].tolist()},
                       {"label": "ignore", "points": polygons[-1].tolist()}],
        }
        (folder / f"img_{index:03d}.json").write_text(json.dumps(annotation))
    return root


def bench_data_loading(settings: BenchSettings, scratch: Path) -> list[BenchRow]:
    """Samples per second of what one DataLoader worker does, on 640x480 JPEGs.

    Per sample: ReasonSeg reading (JPEG decode, polygons, 3 questions), the project's
    :class:`SampleEncoder` (Qwen2.5-VL image processor at the project's default limits, SAM
    transform at 1024), and collating into batches of 2 -- in this (the main) process.
    """
    from model.sam import SamTransform
    from model.batch import collate
    from utils.data.reason_seg import ReasonSegDataset

    count = 4 if settings.smoke else 16
    passes = 1 if settings.smoke else 3 if settings.quick else 5
    root = scratch / "jpeg_640x480"
    if not (root / "reason_seg" / "ReasonSeg" / "train" / f"img_{count - 1:03d}.json").is_file():
        write_reason_seg_jpegs(root, count)
    dataset = ReasonSegDataset(str(root), "train", mode="train", explanatory_rate=0.0, text_only_rate=0.0)
    processor = default_qwen25_processor()
    encoder = SampleEncoder(processor, SamTransform(1024))
    pad = processor.tokenizer.pad_token_id

    def one_pass() -> dict:
        samples = [encoder(dataset[i]) for i in range(len(dataset))]
        for start in range(0, len(samples), 2):
            collate(samples[start:start + 2], pad, "right")
        return samples[0]

    times, last = interleaved({"ours": one_pass}, passes, torch.device("cpu"))
    rate = len(dataset) / median(times["ours"])
    sample = last["ours"]
    image_tokens = int(sample["image_grid_thw"].prod()) // 4
    sizes = [p.stat().st_size for p in (root / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg")]
    check_ok = tuple(sample["sam_pixel_values"].shape) == (3, 1024, 1024) and sample["original_size"] == (480, 640)
    return [
        BenchRow(
            name="data loading, one worker, 640x480 JPEGs",
            ours=rate,
            baseline=None,
            unit="samples/s",
            goal=">= 10 per worker",
            met=rate >= 10.0,
            check=f"SAM input {tuple(sample['sam_pixel_values'].shape)}, Qwen grid {sample['image_grid_thw'].tolist()[0]} "
                  f"({image_tokens} image tokens), {len(sample['masks'])} masks per sample",
            check_passed=check_ok,
            ours_is="ReasonSeg reader + SampleEncoder + collate, in the main process",
            details={"seconds_per_pass": times["ours"], "samples_per_pass": len(dataset),
                     "mean_jpeg_bytes": int(np.mean(sizes)), "qwen_pixels": [QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS],
                     "sam_image_size": 1024, "questions_per_sample": 3},
        )
    ]


# ---------------------------------------------------------------------------------------------
# Real-size figures (GPU)
# ---------------------------------------------------------------------------------------------


def build_real_size_segmenter(spec, sam_variant: str, device: torch.device, dtype: torch.dtype, processor):
    """A segmenter of ``spec``'s real size with random weights, built on ``device`` in ``dtype``.

    The processor's tokenizer is the tiny one (its ids index the random embedding); the image
    processor has the project's default limits for Qwen2.5-VL (at most 1,280 image tokens).
    """
    from model.sam import build_sam, sam_prompt_embed_dim
    from model.vlm import VLM_FAMILIES

    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    model_class = VLM_FAMILIES[spec.family].model_class
    text = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.text.items()}
    text.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = {k: (list(v) if isinstance(v, list) else v) for k, v in spec.vision.items()}
    config = model_class.config_class(
        text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_word_embeddings, **ids
    )
    torch.manual_seed(0)
    with torch.device(device):
        vlm = model_class._from_config(config, dtype=dtype)
        sam = build_sam(sam_variant)
    ensure_seg_token(vlm, tokenizer)
    vlm.requires_grad_(False)
    segmenter_config = SegmenterConfig(
        vlm_family=spec.family, sam_variant=sam_variant, hidden_size=text_hidden_size(vlm.config),
        prompt_dim=sam_prompt_embed_dim(sam),
    )
    # Built outside the device context (SamTransform's constants stay on the CPU, where the
    # images are preprocessed); the projection then joins the rest on the device.
    return ReasonSegmenter(segmenter_config, vlm, processor, sam).to(device)


def _cuda_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def bench_real_size(
    settings: BenchSettings, model_names: Sequence[str] = ("qwen2.5-vl-3b", "qwen2.5-vl-7b"),
    sam_variant: str = "vit_h", spec_override=None,
) -> list[BenchRow]:
    """Real-size Qwen2.5-VL + SAM with random weights: a bf16 training step (batch 2 of 640x480
    images with 3 questions each, gradient checkpointing, AdamW on fp32 trainable weights, frozen
    VLM in bf16, bf16 autocast -- as train_ddp.py) with its peak memory, and one request (the
    whole model in bf16, 32 new tokens) with its latency and peak memory.

    ``spec_override`` (with a tiny SAM) runs the same code on a CPU: the numbers are then not
    real-size figures and the rows say so.
    """
    from model.param_count import VLM_SPECS, resolve_model_name
    from utils.optim import build_optimizer

    device = settings.torch_device
    dtype = torch.bfloat16
    specs = [("tiny config", spec_override)] if spec_override is not None else [
        (name, VLM_SPECS[resolve_model_name(name)]) for name in model_names]
    processor = default_qwen25_processor()
    steps = 1 if settings.smoke else 2 if settings.quick else 3
    rows = []
    for label, spec in specs:
        is_7b = "7b" in label.lower()
        title = f"{label} + SAM {sam_variant}" if spec_override is not None else (
            f"{spec.hf_id.split('/')[-1].replace('-Instruct', '')} + SAM {sam_variant.replace('vit_', 'ViT-').replace('ViT-h', 'ViT-H').replace('ViT-b', 'ViT-B').replace('ViT-l', 'ViT-L')}")
        # --- training step
        model = build_real_size_segmenter(spec, sam_variant, device, dtype, processor)
        model.configure_training(LoraSettings())
        # As utils/trainer.py: trainable weights in fp32 (master weights), the frozen VLM in bf16,
        # SAM's frozen encoders in fp32; bf16 autocast.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        for param in model.vlm.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.vlm.enable_input_require_grads()
        optimizer = build_optimizer(model, 3e-4, 0.0, (0.9, 0.95))
        batch = training_batch(model, settings.seed, batch_size=2, turns=3)
        weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_times = []
        for step in range(1 + steps):  # the first step allocates the AdamW state
            seconds, loss = timed(lambda: _train_step(model, optimizer, batch, dtype), device)
            if step:
                step_times.append(seconds)
        train_peak = _cuda_peak(device)
        train_ok = bool(np.isfinite(loss))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model, optimizer, batch
        _free(device)
        # --- one request
        model = build_real_size_segmenter(spec, sam_variant, device, dtype, processor).to(dtype).eval()
        # SAM's positional encoding builds an fp32 grid and multiplies it by its Gaussian matrix:
        # a bf16 prompt encoder fails there, so it stays fp32 (a few KB).
        model.sam.prompt_encoder.float()
        image, _, _ = scene(settings.seed + 40)
        num_tokens = settings.token_counts[0]
        ids = answer_script(processor.tokenizer, num_tokens, model.seg_token_id, num_seg=1)
        request_weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def request() -> SegmentationResult:
            batch = request_batch(model, [image], [QUESTIONS[0]])
            return model.generate(batch, num_tokens, logits_processor=_scripted(model, batch, ids))[0]

        times, last = interleaved({"ours": request}, steps, device)
        infer_peak = _cuda_peak(device)
        result = last["ours"]
        infer_ok = len(result.token_ids) == num_tokens and len(result.masks) == 1
        del model
        _free(device)
        size_note = "" if spec_override is None else " (tiny config, not real size)"
        common_details = {"device": str(device), "dtype": "bf16"}
        rows += [
            BenchRow(
                name=f"{title}: training step, bf16, batch 2, gradient checkpointing{size_note}",
                ours=median(step_times), baseline=None, unit="s", goal="report",
                check=f"finite loss: {'yes' if train_ok else 'NO'}; {trainable / 1e6:.1f} M trainable",
                check_passed=train_ok, ours_is="default LoRA + [SEG] rows",
                details={**common_details, "step_times": step_times, "trainable_params": trainable},
            ),
            BenchRow(
                name=f"{title}: training step peak memory{size_note}",
                ours=None if train_peak is None else train_peak / GB, baseline=None, unit="GB",
                goal="<= 40 GB" if is_7b else "report",
                met=(train_peak <= 40 * GB) if (is_7b and train_peak is not None) else None,
                check="torch.cuda.max_memory_allocated" if train_peak is not None else "CUDA only",
                check_passed=train_ok, ours_is="default LoRA + [SEG] rows",
                details={**common_details, "weights_bytes": weights_bytes, "peak_bytes": train_peak},
            ),
            BenchRow(
                name=f"{title}: one request, {num_tokens} new tokens{size_note}",
                ours=median(times["ours"]), baseline=None, unit="s", goal="report",
                check=f"{len(result.token_ids)} tokens, {len(result.masks)} mask", check_passed=infer_ok,
                ours_is="KV-cache generation, bf16",
                details={**common_details, "times": times["ours"]},
            ),
            BenchRow(
                name=f"{title}: one request peak memory{size_note}",
                ours=None if infer_peak is None else infer_peak / GB, baseline=None, unit="GB",
                goal="<= 20 GB" if is_7b else "report",
                met=(infer_peak <= 20 * GB) if (is_7b and infer_peak is not None) else None,
                check="torch.cuda.max_memory_allocated" if infer_peak is not None else "CUDA only",
                check_passed=infer_ok, ours_is="KV-cache generation, bf16",
                details={**common_details, "weights_bytes": request_weights, "peak_bytes": infer_peak},
            ),
        ]
    return rows


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------


def machine_info(settings: BenchSettings) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": settings.device,
    }
    if settings.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def run_benchmarks(
    settings: BenchSettings, only: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the selected benchmarks (all of :data:`BENCHMARKS` by default) and return the report."""
    selected = list(only) if only else [name for name in BENCHMARKS if name != "real_size" or settings.real_size]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    if "real_size" in selected and not settings.real_size:
        settings.real_size = "real" if settings.device == "cuda" else "tiny"
    if settings.real_size == "real" and settings.device != "cuda":
        raise RuntimeError("real-size figures need --device cuda (use --real_size_config tiny to check the code path)")
    scratch_holder = None
    if settings.scratch:
        scratch = Path(settings.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    else:
        scratch_holder = tempfile.TemporaryDirectory(prefix="benchmark_")
        scratch = Path(scratch_holder.name)
    say = progress or (lambda message: logger.info(message))
    started = time.perf_counter()
    start_info = machine_info(settings)
    rows: list[BenchRow] = []
    durations: dict[str, float] = {}
    shared_model = None
    try:
        for name in BENCHMARKS:
            if name not in selected:
                continue
            say(f"running {name} ...")
            begin = time.perf_counter()
            torch.manual_seed(settings.seed)
            if name in ("generation", "batched"):
                if shared_model is None:
                    shared_model = build_segmenter(settings.hidden_size, settings.num_layers, "tiny", seed=settings.seed)
                new = (bench_generation if name == "generation" else bench_batched)(settings, shared_model)
            elif name == "repeated_image":
                new = bench_repeated_image(settings)
            elif name == "training_step":
                new = bench_training_step(settings)
            elif name == "params":
                new = bench_params(settings)
            elif name == "ddp":
                new = bench_ddp(settings, scratch)
            elif name == "data_loading":
                new = bench_data_loading(settings, scratch)
            else:
                from model.param_count import tiny_spec

                spec = tiny_spec() if settings.real_size == "tiny" else None
                new = bench_real_size(settings, sam_variant="tiny" if spec is not None else "vit_h", spec_override=spec)
            durations[name] = time.perf_counter() - begin
            for row in new:
                row.details["benchmark"] = name
                say(format_row_line(row))
            rows.extend(new)
            _free(settings.torch_device)
    finally:
        if scratch_holder is not None:
            scratch_holder.cleanup()
    end_info = machine_info(settings)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "model": (f"tiny Qwen2.5-VL (model.tiny.build_tiny_vlm), text hidden {settings.hidden_size}, "
                  f"{settings.num_layers} layers, random weights"),
        "machine": start_info,
        "load_average_end": end_info["load_average"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "seconds": time.perf_counter() - started,
        "seconds_by_benchmark": durations,
        "rows": [row.to_dict() for row in rows],
    }


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _met_text(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "no"


def format_row_line(row: BenchRow) -> str:
    ratio = row.ratio
    return (f"{row.name}: ours {fmt(row.ours)} {row.unit}, baseline {fmt(row.baseline)}, ratio {_ratio_text(ratio)}, "
            f"goal {row.goal} -> {_met_text(row.met)}; check {'ok' if row.check_passed else 'FAILED' if row.check_passed is False else '-'}")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a markdown table."""
    lines = [
        "| measurement | ours | baseline | unit | baseline / ours | goal | met | check |",
        "| --- | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for row in report["rows"]:
        status = "ok" if row["check_passed"] else "FAILED" if row["check_passed"] is False else "-"
        lines.append(
            f"| {_cell(row['name'])} | {fmt(row['ours'])} | {fmt(row['baseline'])} | {row['unit']} | "
            f"{_ratio_text(row['ratio'])} | {_cell(row['goal'])} | {_met_text(row['met'])} | {status}: {_cell(row['check'])} |"
        )
    return "\n".join(lines)


def format_sides(report: dict[str, Any]) -> str:
    """What each side of each row is (for the README)."""
    seen, lines = set(), []
    for row in report["rows"]:
        key = (row["details"].get("benchmark"), row["ours_is"], row["baseline_is"])
        if key in seen:
            continue
        seen.add(key)
        baseline = f"; baseline: {row['baseline_is']}" if row["baseline_is"] else ""
        lines.append(f"- {row['name']}: ours: {row['ours_is']}{baseline}")
    return "\n".join(lines)
