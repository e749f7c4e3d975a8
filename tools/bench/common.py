"""What every benchmark of ``tools/benchmark.py`` shares: settings, rows, timing, the test models
and inputs, the scripted answer and the correctness check.

The benchmark compares this project with the published approach (LISA / VLMSAM) reproduced *on
our model* (:mod:`tools.bench.generation`, :mod:`tools.bench.training`), and measures the keyed
GPU rows of issues 11 and 12 at real size (:mod:`tools.bench.gpu_rows`,
:mod:`tools.bench.real_size`); :mod:`tools.bench.report` runs them and formats the report.

Whatever the random weights say, both sides of a comparison are made to produce exactly the same
tokens (a scripted answer with ``[SEG]`` inside, forced by :class:`ScriptedAnswer`), and each row
carries a correctness check that both sides gave the same ``[SEG]`` states and masks (or losses).

Conventions of a :class:`BenchRow`: ``ours`` and ``baseline`` are medians of a quantity where
lower is better (seconds, milliseconds per sample, bytes...), so ``ratio = baseline / ours`` is
how many times faster (or smaller) ours is. Rows without a baseline (data loading) have
``baseline = ratio = None``.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from model.batch import to_device
from model.config import SegmenterConfig
from model.image_tokens import DEFAULT_MAX_IMAGE_TOKENS
from model.segmenter import ReasonSegmenter, SegmentationResult
from model.vlm import ensure_seg_token, text_hidden_size

REPO = Path(__file__).resolve().parents[2]
GB = 1e9
MB = 1e6

#: Rows, in table order, by the name ``--only`` accepts. The last two fill the keyed GPU rows
#: (issues 11 and 12) at real size; ``real_size`` names both.
BENCHMARKS = ("generation", "repeated_image", "batched", "training_step", "params", "ddp", "preprocessing",
              "data_loading", "real_size_inference", "real_size_training")
BENCHMARK_GROUPS = {"real_size": ("real_size_inference", "real_size_training")}

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
        real_size: "real" (Qwen2.5-VL-7B + SAM ViT-H, needs CUDA: the keyed GPU rows), "tiny" (the
            same code path on a tiny configuration on a CPU: a check, the GPU rows stay "not
            measured") or "" (skip).
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

    @property
    def real_size_repeats(self) -> int:
        """Timed repetitions of a real-size measurement (after one warm-up)."""
        return 1 if self.smoke else 2 if self.quick else 3

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
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


def free_memory(device: torch.device) -> None:
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
    """Greedy decoding produces ``token_ids`` (then repeats the last one), whatever the weights.

    ``prompt_length=None``: the length of the first ``input_ids`` seen (the prompt), for calls that
    build the batch themselves (``ReasonSegmenter.predict``, ``InferenceSession.ask``); one
    instance per request then.
    """

    def __init__(self, token_ids: Sequence[int], prompt_length: int | None = None) -> None:
        self.token_ids = list(token_ids)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
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


def scripted(ids: Sequence[int], batch: dict | None = None) -> LogitsProcessorList:
    """A fresh :class:`ScriptedAnswer` for one request (of ``batch``, or of the next call)."""
    return LogitsProcessorList([ScriptedAnswer(ids, None if batch is None else batch["input_ids"].shape[1])])


def request_batch(model: ReasonSegmenter, images: Sequence[np.ndarray], questions: Sequence[str]) -> dict:
    """A left-padded generation batch of one open question per image, on the model's device."""
    samples = [model.prepare(image, [(question, None)]) for image, question in zip(images, questions)]
    return to_device(model.collate(samples, padding_side="left"), model.device)


def compare_results(
    ours: Sequence[SegmentationResult], theirs: Sequence[SegmentationResult], atol: float | None,
    min_agreement: float = 0.999,
) -> dict:
    """Same tokens, same ``[SEG]`` states (max abs difference <= atol; None: reported, not
    required, as between bf16 paths) and masks equal on at least ``min_agreement`` of the pixels."""
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
    states_ok = atol is None or max_diff <= atol
    passed = bool(same_tokens and shapes_ok and num_seg > 0 and states_ok and agreement >= min_agreement)
    tolerance = "not required" if atol is None else f"tol {atol:g}"
    text = (
        f"same tokens: {'yes' if same_tokens else 'NO'}; {num_seg} [SEG] states, max abs diff {max_diff:.1e} "
        f"({tolerance}); mask pixels equal {100 * agreement:.2f}%"
    )
    return {"passed": passed, "text": text, "max_state_diff": max_diff, "mask_agreement": agreement,
            "same_tokens": same_tokens, "num_seg_states": num_seg}

