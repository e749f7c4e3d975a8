"""Generation side by side: this project's ``ReasonSegmenter.generate`` against the published
inference (LISA / VLMSAM) reproduced on our model, the same image asked again, and batching.

* :func:`published_generate` -- generation with ``use_cache=False``, then a second forward pass
  over the whole sequence to read the ``[SEG]`` states (what LISA and VLMSAM do), against
  :meth:`ReasonSegmenter.generate` (KV cache, ``[SEG]`` states gathered on the way).
* the same image asked about 5 times: every request re-encodes (no cache) against
  :class:`model.image_cache.FeatureCache` (the SAM embedding) and :class:`model.decoding.PrefixCache` (the image prefix's keys and values) reused.
* 8 requests one at a time (a Python loop) against one left-padded batch.
"""

from __future__ import annotations

import torch

from model.batch import vlm_inputs
from model.segmenter import ReasonSegmenter, SegmentationResult
from utils.masks import mask_to_box

from .common import (
    QUESTIONS,
    BenchRow,
    BenchSettings,
    answer_script,
    build_segmenter,
    compare_results,
    interleaved,
    median,
    request_batch,
    scene,
    scripted,
    timed,
)


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
    with model.capture_final_states() as captured:
        model.vlm(**full, use_cache=False)
    hidden = captured[-1]
    image_embeddings = model.encode_images(batch["sam_pixel_values"], batch["sam_input_size"])
    stop_ids = model._stop_token_ids()
    results = []
    for index in range(len(generated)):
        tokens = generated[index].tolist()
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        tokens = tokens[:end]
        positions = [prompt_length + j + model.seg_state_offset for j, token in enumerate(tokens)
                     if token == model.seg_token_id]
        result = SegmentationResult(
            text=model.processor.tokenizer.decode(tokens, skip_special_tokens=False), token_ids=tokens
        )
        if positions:
            states = hidden[index, positions]
            result.seg_states = states
            [logits] = model.decode_masks(
                image_embeddings[index : index + 1], [states], batch["sam_input_size"][index : index + 1],
                batch["original_size"][index : index + 1],
            )
            result.masks = [mask.cpu().numpy() for mask in logits > 0]
            result.boxes = [mask_to_box(mask) for mask in result.masks]
        results.append(result)
    return results



# ---------------------------------------------------------------------------------------------
# The rows: one request, the same image again, 8 requests
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
                "ours": lambda: model.generate(batch, num_tokens, logits_processor=scripted(ids, batch)),
                "baseline": lambda: published_generate(model, batch, num_tokens, logits_processor=scripted(ids, batch)),
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
    from model.decoding import PrefixCache
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

    def request(question: str, prefixes: PrefixCache | None = None) -> SegmentationResult:
        batch = request_batch(model, [image], [question])
        return model.generate(batch, num_tokens, logits_processor=scripted(ids, batch), prefix_cache=prefixes)[0]

    times: dict[str, list[list[float]]] = {"ours": [], "baseline": []}
    results: dict[str, list[SegmentationResult]] = {"ours": [], "baseline": []}
    stats = []
    for round_index in range(rounds):
        cache, prefixes = FeatureCache(max_items=8), PrefixCache(max_items=8)
        times["ours"].append([])
        times["baseline"].append([])
        results = {"ours": [], "baseline": []}
        for request_index, question in enumerate(questions):
            order = ("ours", "baseline") if (round_index + request_index) % 2 == 0 else ("baseline", "ours")
            for side in order:
                if side == "ours":
                    with cache.attached(model):
                        seconds, result = timed(lambda: request(question, prefixes), device)
                else:
                    seconds, result = timed(lambda: request(question), device)
                times[side][-1].append(seconds)
                results[side].append(result)
        stats.append({**cache.stats, **{f"prefix_{k}": v for k, v in prefixes.stats.items()}})
    first = {side: median([r[0] for r in times[side]]) for side in times}
    later = {side: median([t for r in times[side] for t in r[1:]]) for side in times}
    check = compare_results(results["ours"], results["baseline"], atol=1e-5)
    expected_hits = len(questions) - 1
    # Requests 2-5 reuse the SAM embedding and the image prefix's keys and values (so the vision
    # tower does not run at all: no vision-cache lookups either).
    cache_ok = all(s["sam_hits"] == expected_hits and s["prefix_hits"] == expected_hits and s["vision_hits"] == 0
                   for s in stats)
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
            check=check["text"] + f"; cache hits SAM {stats[-1]['sam_hits']}, image prefix {stats[-1]['prefix_hits']} of {expected_hits}",
            check_passed=check["passed"],
            ours_is="image reused: SAM embedding (FeatureCache) and the image prefix's keys and values (PrefixCache)",
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
        return model.generate(batch, num_tokens, logits_processor=scripted(ids, batch))

    def one_at_a_time() -> list[SegmentationResult]:
        results = []
        for image, question in zip(images, questions):
            batch = request_batch(model, [image], [question])
            results.extend(model.generate(batch, num_tokens, logits_processor=scripted(ids, batch)))
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

