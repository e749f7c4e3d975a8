"""Real size on a GPU: Qwen2.5-VL-7B + SAM ViT-H with random weights, built in bf16 on the device in
about a second, measured through the product's own API; fills the keyed rows of
:mod:`tools.bench.gpu_rows` (issues 11 and 12).

* :func:`measure_inference` -- ``ReasonSegmenter.predict`` at 32 and 128 new tokens (preprocessing
  included) against the published generation, the decode time per token (the difference of the
  two lengths), ``InferenceSession.ask`` on the same image 5 times, the SAM encoder
  (``encode_images``), the prefill (one forward of the VLM over the prompt) and 8 requests in
  one batch against one at a time. SAM's encoder is compiled where ``--compile_sam``'s default
  compiles it (CUDA), as the app, the interactive loop and ``test.py`` run it; the SAM row gives
  both ways.
* :func:`measure_training` -- the model's forward + backward + AdamW step (as ``utils/trainer.py``,
  bf16 autocast, trainable weights fp32) with ``train_ddp.py``'s defaults (SAM's encoder compiled on
  CUDA) at batch 2 with and without gradient
  checkpointing and at growing batch sizes, then the published way (the whole embedding and LM
  head trainable, SAM's official attention, no checkpointing) at batch 2.

Both take ``spec`` / ``sam_variant`` so that tests run the same code on a tiny configuration on a
CPU (a check of the code path: those numbers are not GPU rows). Each returns
``{"values": {key: value}, "details": {key: {...}}, "counts": {...}, "errors": {key: text}}``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from model.batch import vlm_inputs
from model.config import SegmenterConfig
from model.segmenter import ReasonSegmenter
from model.vlm import LoraSettings, ensure_seg_token, text_hidden_size
from utils.trainer import training_dtype

from .common import (
    GB,
    QUESTIONS,
    answer_script,
    compare_results,
    default_qwen25_processor,
    free_memory,
    interleaved,
    median,
    request_batch,
    scene,
    scripted,
    timed,
)
from .generation import published_generate
from .gpu_rows import count_flops, decode_weight_bytes
from .training import apply_published_training_recipe, train_step, training_batch

#: Training batch sizes tried for the best samples/s, and the memory a batch size must fit.
TRAIN_BATCH_SIZES = (2, 4, 8, 16)
TRAIN_MEMORY_LIMIT_BYTES = 80 * GB
#: Masks of two bf16 paths (ours against eager, ours against the published way) must agree on
#: at least this share of the pixels (issue 11's GPU check).
BF16_MASK_AGREEMENT = 0.99


def build_real_size_segmenter(
    spec, sam_variant: str, device: torch.device, dtype: torch.dtype, processor, sam_attention: str = "sdpa",
    packed_vision_attention: bool = True,
) -> ReasonSegmenter:
    """A segmenter of ``spec``'s real size with random weights, built on ``device`` in ``dtype``.

    The processor's tokenizer is the tiny one (its ids index the random embedding); the image
    processor has the project's default limits for Qwen2.5-VL (at most 1,280 image tokens).
    ``sam_attention``: SAM's image-encoder attention (``build_sam``: "sdpa" or "official").
    ``packed_vision_attention``: the vision tower's windows in one attention call per layer, as
    ``load_vlm`` sets it (False: transformers' default, one call per window).
    """
    from model.sam import build_sam, sam_prompt_embed_dim
    from model.vision_attention import use_packed_vision_attention
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
        sam = build_sam(sam_variant, attention=sam_attention)
    if packed_vision_attention:
        use_packed_vision_attention(vlm)
    ensure_seg_token(vlm, tokenizer)
    vlm.requires_grad_(False)
    segmenter_config = SegmenterConfig(
        vlm_family=spec.family, sam_variant=sam_variant, hidden_size=text_hidden_size(vlm.config),
        prompt_dim=sam_prompt_embed_dim(sam),
    )
    # Built outside the device context (SamTransform's constants stay on the CPU, where the
    # images are preprocessed); the projection then joins the rest on the device.
    return ReasonSegmenter(segmenter_config, vlm, processor, sam).to(device)


def _compile_sam_as_default(model: ReasonSegmenter, batch: dict) -> float | None:
    """Compile SAM's image encoder where ``--compile_sam``'s default does (CUDA) and run it once
    on ``batch``'s first image (the compile); its seconds, or None where it stays eager."""
    from model.sam_compile import compile_image_encoder_as_asked

    if not compile_image_encoder_as_asked(model.sam.image_encoder, None, model.device):
        return None
    with torch.no_grad():
        seconds, _ = timed(lambda: model.encode_images(batch["sam_pixel_values"][:1], batch["sam_input_size"][:1]),
                           model.device)
    return seconds


def real_spec(spec=None):
    """``spec``, or Qwen2.5-VL-7B's."""
    if spec is not None:
        return spec
    from .param_count import VLM_SPECS, resolve_model_name

    return VLM_SPECS[resolve_model_name("qwen2.5-vl-7b")]


def compile_seconds(model: ReasonSegmenter) -> dict[str, float]:
    """The one-time compile cost of each (batch, cache length) shape the compiled decoder met."""
    decoder = getattr(model, "_decoders", {}).get("compiled")
    return {f"batch {b}, cache {n}": seconds for (b, n), seconds in (decoder.compile_seconds if decoder else {}).items()}


def eager_decoding(model: ReasonSegmenter) -> dict[str, str]:
    """``{"decoding": "eager"}`` where ``ReasonSegmenter.generate`` has that parameter, else ``{}``."""
    return {"decoding": "eager"} if "decoding" in inspect.signature(model.generate).parameters else {}


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _times(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    times = []
    for index in range(warmup + repeats):
        seconds, _ = timed(fn, device)
        if index >= warmup:
            times.append(seconds)
    return times


def _count(out: "_Measured", name: str, fn: Callable[[], Any], say: Callable[[str], None]) -> None:
    """``out.counts[name]`` = the FLOPs of one call of ``fn`` (for the floor); a failure (an op
    the counter cannot follow) leaves the floor out, not the row."""
    try:
        out.counts[name], _ = count_flops(fn)
    except Exception as error:  # noqa: BLE001
        say(f"  counting the FLOPs of {name} failed ({type(error).__name__}: {error}); no floor")


class _Measured:
    """What a measurement collects (see the module docstring)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.details: dict[str, dict] = {}
        self.counts: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def attempt(self, keys: tuple[str, ...], fn: Callable[[], None], say: Callable[[str], None]) -> None:
        """Run one measurement; a failure marks its keys failed and the others go on."""
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
            text = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            say(f"  {', '.join(keys)} failed: {text}")
            for key in keys:
                self.errors.setdefault(key, text)

    def as_dict(self) -> dict[str, Any]:
        return {"values": self.values, "details": self.details, "counts": self.counts, "errors": self.errors}


# ---------------------------------------------------------------------------------------------
# Inference (issue 11)
# ---------------------------------------------------------------------------------------------


def measure_inference(
    settings, spec=None, sam_variant: str = "vit_h", say: Callable[[str], None] = print,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The inference rows of issue 11 (see the module docstring); ``on_update(measured so far)``
    after each measurement."""
    from utils.inference import InferenceSession

    device = settings.torch_device
    dtype = training_dtype(device, "bf16")  # float32 on a CPU, as train_ddp.py: a CPU run checks the code path
    spec = real_spec(spec)
    processor = default_qwen25_processor()
    model = build_real_size_segmenter(spec, sam_variant, device, dtype, processor)
    model.cast_for_run(dtype, trainable_dtype=dtype).eval()
    tokenizer = processor.tokenizer
    image = scene(settings.seed + 40)[0]
    question = QUESTIONS[0]
    # SAM's encoder as the long-running entry points run it (--compile_sam's default: compiled on
    # CUDA), compiled now for one image as the app's warm-up does.
    sam_compile_s = _compile_sam_as_default(model, request_batch(model, [image], [question]))
    short, long = settings.token_counts
    repeats = settings.real_size_repeats
    eager = eager_decoding(model)
    out = _Measured()
    common = {"model": f"{spec.hf_id.split('/')[-1]} + SAM {sam_variant}, random weights", "dtype": str(dtype),
              "decoding": "default" + (" (ReasonSegmenter.generate has decoding=)" if eager else ""),
              "sam_encoder": "compiled (--compile_sam's default on CUDA)" if sam_compile_s is not None else "eager",
              "image": "640x480 photo-like scene"}

    def ids(num_tokens: int) -> list[int]:
        return answer_script(tokenizer, num_tokens, model.seg_token_id, num_seg=1)

    def ours(num_tokens: int, **kwargs):
        return model.predict([image], [question], max_new_tokens=num_tokens,
                             logits_processor=scripted(ids(num_tokens)), **kwargs)

    def published(num_tokens: int):
        batch = request_batch(model, [image], [question])
        return published_generate(model, batch, num_tokens, logits_processor=scripted(ids(num_tokens), batch))

    def requests() -> None:
        _reset_peak(device)
        times, last = interleaved(
            {"ours_short": lambda: ours(short), "ours_long": lambda: ours(long),
             "published_long": lambda: published(long)},
            repeats, device)
        peak = _peak_bytes(device)
        ours_short, ours_long, published_long = (
            median(times[k]) for k in ("ours_short", "ours_long", "published_long"))
        versus_published = compare_results(last["ours_long"], last["published_long"], None, BF16_MASK_AGREEMENT)
        checks = {"vs_published": versus_published["text"]}
        passed = versus_published["passed"] and len(last["ours_short"][0].token_ids) == short
        eager_times = {}
        if eager:  # the fast path against eager decoding: same tokens, masks
            eager_times["short"], eager_short = timed(lambda: ours(short, **eager), device)
            eager_times["long"], _ = timed(lambda: ours(long, **eager), device)
            versus_eager = compare_results(last["ours_short"], eager_short, None, BF16_MASK_AGREEMENT)
            checks["vs_eager"] = versus_eager["text"]
            passed = passed and versus_eager["passed"]
        check = {"check": "; ".join(f"{k}: {v}" for k, v in checks.items()), "check_passed": bool(passed)}
        out.counts["request_new_tokens"] = short
        out.values["gpu_request_32_s"] = ours_short
        prompt_tokens = int(request_batch(model, [image], [question])["input_ids"].shape[1])
        out.details["gpu_request_32_s"] = {**common, **check, "times_s": times["ours_short"], "new_tokens": short,
                                           "peak_gb": None if peak is None else peak / GB,
                                           "prompt_tokens": prompt_tokens,
                                           "compile_s": compile_seconds(model)}
        out.values["gpu_decode_ms_per_token"] = 1e3 * (ours_long - ours_short) / (long - short)
        decode_details = {**common, **check, "how": f"(request of {long} tokens - request of {short}) / {long - short}",
                          "times_short_s": times["ours_short"], "times_long_s": times["ours_long"]}
        if eager_times:
            eager_ms = 1e3 * (eager_times["long"] - eager_times["short"]) / (long - short)
            decode_details["eager_ms_per_token_one_run"] = eager_ms
        out.details["gpu_decode_ms_per_token"] = decode_details
        out.values["gpu_request_128_vs_published"] = published_long / ours_long
        out.details["gpu_request_128_vs_published"] = {
            **common, **check, "new_tokens": long, "ours_s": ours_long, "published_s": published_long,
            "times_ours_s": times["ours_long"], "times_published_s": times["published_long"],
            "published_is": "generate(use_cache=False), then a second full forward for the [SEG] states "
                            "(SAM's encoder the same as ours: compiled on CUDA, so the ratio slightly understates ours)"}

    def follow_ups() -> None:
        # One session for every round, warmed up first, as the app and the interactive loop hold
        # one: a session answers on a thread of its own, and torch records CUDA graphs per thread,
        # so a new session's first request would pay the recording (about 0.3 s on an H200), which
        # no user's first question does. Each round asks about a new image.
        rounds = 1 if (settings.quick or settings.smoke) else 2
        first, later, reused = [], [], []
        session = InferenceSession(model, max_new_tokens=short, cache_size=8)
        try:
            warm_up_s = session.warm_up(scene(settings.seed + 59)[0])
            for round_index in range(rounds):
                round_image = scene(settings.seed + 50 + round_index)[0]
                for index, text in enumerate(QUESTIONS[:5]):
                    seconds, answer = timed(
                        lambda: session.ask(round_image, text, logits_processor=scripted(ids(short))), device)
                    (first if index == 0 else later).append(seconds)
                    reused.append(bool(answer.features_reused))
        finally:
            session.close()
        out.values["gpu_followup_speedup"] = median(first) / median(later)
        ok = not any(reused[i] for i in range(0, len(reused), 5)) and all(
            reused[i] for i in range(len(reused)) if i % 5)
        out.details["gpu_followup_speedup"] = {
            **common, "first_s": first, "later_s": later, "rounds": rounds, "new_tokens": short,
            "warm_up_s": warm_up_s,
            "check": f"features reused on requests 2-5 and not on request 1: {'yes' if ok else 'NO'}",
            "check_passed": ok, "how": "utils.inference.InferenceSession.ask, one session warmed up "
                                       "(InferenceSession.warm_up), 5 questions on a new image per round"}

    def sam_encoder() -> None:
        from model.sam_compile import compile_image_encoder, image_encoder_is_compiled, uncompile_image_encoder

        batch = request_batch(model, [image], [question])
        pixels, sizes = batch["sam_pixel_values"][:1], batch["sam_input_size"][:1]
        repeats, warmup = (2, 1) if settings.smoke else (10, 3)
        encoder = model.sam.image_encoder
        encode = lambda: model.encode_images(pixels, sizes)  # noqa: E731
        # Both ways, whichever is the default: the eager encoder, then the compiled one.
        uncompile_image_encoder(encoder)
        try:
            with torch.no_grad():
                eager_times = _times(encode, device, repeats, warmup=warmup)
                _count(out, "sam_encode_flops", encode, say)
                eager = encode()
                compile_image_encoder(encoder)
                first_s, compiled = timed(encode, device)
                compiled_times = _times(encode, device, repeats, warmup=warmup - 1)
                still_compiled = image_encoder_is_compiled(encoder)
        finally:
            if sam_compile_s is None:
                uncompile_image_encoder(encoder)
            elif not image_encoder_is_compiled(encoder):
                compile_image_encoder(encoder)
        difference = float((compiled.float() - eager.float()).abs().max())
        scale = float(eager.float().abs().max())
        default_times = compiled_times if sam_compile_s is not None else eager_times
        out.values["gpu_sam_encode_ms"] = 1e3 * median(default_times)
        out.details["gpu_sam_encode_ms"] = {
            **common, "times_s": default_times, "input": list(pixels.shape), "how": "ReasonSegmenter.encode_images",
            "eager": {"ms": 1e3 * median(eager_times), "times_s": eager_times},
            "compile_sam": {
                "ms": 1e3 * median(compiled_times), "times_s": compiled_times, "compile_s": sam_compile_s,
                "first_call_s": first_s, "compiled": still_compiled, "max_abs_difference": difference,
                "max_abs_eager": scale,
                "how": "the same call with --compile_sam (model.sam_compile: the blocks compiled, inductor); "
                       "compile_s: its first call at the start (None: not the default here, and first_call_s "
                       "paid it); compiled False: compiling failed and it ran eagerly"}}

    def prefill() -> None:
        inputs = vlm_inputs(request_batch(model, [image], [question]))
        with torch.no_grad():
            forward = lambda: model.vlm(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            times = _times(forward, device, 2 if settings.smoke else 10, warmup=1 if settings.smoke else 3)
            _count(out, "prefill_flops", forward, say)
        out.counts["decode_weight_bytes"] = decode_weight_bytes(model.vlm)
        out.values["gpu_prefill_ms"] = 1e3 * median(times)
        out.details["gpu_prefill_ms"] = {**common, "times_s": times, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                                         "how": "one forward of the VLM over the prompt (vision tower included), "
                                                "KV cache on, logits of the last token"}

    def batched() -> None:
        count = 8
        images = [scene(settings.seed + 30 + i)[0] for i in range(count)]
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]

        def one_batch():
            return model.predict(images, questions, max_new_tokens=short, logits_processor=scripted(ids(short)))

        def one_at_a_time():
            return [result for im, q in zip(images, questions)
                    for result in model.predict([im], [q], max_new_tokens=short, logits_processor=scripted(ids(short)))]

        _reset_peak(device)
        times, last = interleaved({"batch": one_batch, "one_at_a_time": one_at_a_time}, repeats, device)
        peak = _peak_bytes(device)  # the batch's: SAM's 8 images beside the prefill of 8 prompts
        check = compare_results(last["batch"], last["one_at_a_time"], None, BF16_MASK_AGREEMENT)
        out.values["gpu_batched_8_speedup"] = median(times["one_at_a_time"]) / median(times["batch"])
        out.details["gpu_batched_8_speedup"] = {
            **common, "check": check["text"], "check_passed": check["passed"], "new_tokens": short,
            "times_batch_s": times["batch"], "times_one_at_a_time_s": times["one_at_a_time"],
            "peak_gb": None if peak is None else peak / GB,
            "how": "ReasonSegmenter.predict of 8 images and questions against 8 calls of 1"}

    try:
        for keys, fn in (
            (("gpu_request_32_s", "gpu_decode_ms_per_token", "gpu_request_128_vs_published"), requests),
            (("gpu_followup_speedup",), follow_ups),
            (("gpu_sam_encode_ms",), sam_encoder),
            (("gpu_prefill_ms",), prefill),
            (("gpu_batched_8_speedup",), batched),
        ):
            say(f"  measuring {', '.join(keys)} ...")
            out.attempt(keys, fn, say)
            free_memory(device)
            if on_update is not None:
                on_update(out.as_dict())
    finally:
        model = None  # the closures above hold it through this name
        free_memory(device)
    return out.as_dict()


# ---------------------------------------------------------------------------------------------
# Training (issue 12)
# ---------------------------------------------------------------------------------------------


def build_for_training(spec, sam_variant: str, device: torch.device, dtype: torch.dtype, processor,
                       published: bool) -> ReasonSegmenter:
    """Our defaults (LoRA + ``[SEG]`` rows, SAM's SDPA attention, compiled on CUDA as
    ``train_ddp.py`` does by default) or the published way (the same
    LoRA + the whole embedding and LM head, SAM's official attention); frozen weights in
    ``dtype``, trainable ones float32 (``cast_for_run``, as ``utils/trainer.build_model``)."""
    model = build_real_size_segmenter(spec, sam_variant, device, dtype, processor,
                                      sam_attention="official" if published else "sdpa",
                                      packed_vision_attention=not published)
    if published:
        apply_published_training_recipe(model, LoraSettings())
    else:
        model.configure_training(LoraSettings())
    model.cast_for_run(dtype)
    if not published:  # train_ddp.py's default (--compile_sam on CUDA); the published way runs eagerly
        from model.sam_compile import compile_image_encoder_as_asked

        compile_image_encoder_as_asked(model.sam.image_encoder, None, device)
    return model


def _step_times(model, optimizer, batch, device, autocast, repeats: int) -> tuple[list[float], int | None, float]:
    """(timed step seconds, peak bytes, last loss): one warm-up step (it allocates the AdamW
    state), then ``repeats`` timed steps; the peak is over all of them."""
    free_memory(device)
    _reset_peak(device)
    times, loss = [], float("nan")
    for index in range(1 + repeats):
        seconds, loss = timed(lambda: train_step(model, optimizer, batch, autocast), device)
        if index:
            times.append(seconds)
    return times, _peak_bytes(device), loss


def _initial_loss(model, batch, autocast) -> float:
    """The loss of the model as built (eval: no LoRA dropout), for the same-maths check."""
    model.eval()
    context = torch.autocast(model.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.no_grad(), context:
        return float(model(batch).loss)


def measure_training(
    settings, spec=None, sam_variant: str = "vit_h", say: Callable[[str], None] = print,
    batch_sizes: tuple[int, ...] = TRAIN_BATCH_SIZES,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The training rows of issue 12 (see the module docstring); ``on_update(measured so far)``
    after each measurement."""
    from utils.optim import build_optimizer

    device = settings.torch_device
    dtype = training_dtype(device, "bf16")  # float32 on a CPU, as train_ddp.py: a CPU run checks the code path
    autocast = dtype if device.type == "cuda" else None  # as utils/evaluation.autocast_context
    spec = real_spec(spec)
    processor = default_qwen25_processor()
    repeats = settings.real_size_repeats
    out = _Measured()
    common = {"model": f"{spec.hf_id.split('/')[-1]} + SAM {sam_variant}, random weights", "dtype": str(dtype),
              "batch": "640x480 images x 3 questions", "how": "forward + backward + clip + AdamW step, "
              "bf16 autocast, trainable weights fp32 (as utils/trainer.py)"}
    steps: dict[str, float] = {}
    losses: dict[str, float] = {}

    def ours() -> None:
        model = build_for_training(spec, sam_variant, device, dtype, processor, published=False)
        optimizer = build_optimizer(model, 3e-4, 0.0, (0.9, 0.95))
        try:
            batch = training_batch(model, settings.seed, batch_size=2, turns=3)
            losses["ours"] = _initial_loss(model, batch, autocast)
            times, peak, loss = _step_times(model, optimizer, batch, device, autocast, repeats)
            _count(out, "train_step_b2_flops", lambda: train_step(model, optimizer, batch, autocast), say)
            steps["ours"] = median(times)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out.values["gpu_train_step_b2_s"] = steps["ours"]
            out.details["gpu_train_step_b2_s"] = {**common, "times_s": times, "loss": loss,
                                                  "trainable_params": trainable,
                                                  "tokens": int(batch["input_ids"].numel())}
            if peak is not None:
                out.values["gpu_train_peak_gb_b2"] = peak / GB
                out.details["gpu_train_peak_gb_b2"] = {
                    **common, "peak_bytes": peak,
                    "how": "torch.cuda.max_memory_allocated over the steps, weights included"}
            # Larger batches: the best samples/s among those that fit the memory limit.
            rates = {2: 2 / steps["ours"]}
            peaks = {2: peak}
            for size in batch_sizes:
                if size <= 2:
                    continue
                known = sorted(k for k, v in peaks.items() if v is not None)
                if len(known) >= 2:  # peaks grow about linearly with the batch: skip a size that cannot fit
                    (b0, b1), (p0, p1) = known[-2:], (peaks[known[-2]], peaks[known[-1]])
                    expected = p1 + (p1 - p0) * (size - b1) / (b1 - b0)
                    if expected > TRAIN_MEMORY_LIMIT_BYTES:
                        say(f"  batch {size}: skipped (about {expected / GB:.0f} GB expected)")
                        break
                try:
                    big = training_batch(model, settings.seed, batch_size=size, turns=3)
                    times_b, peak_b, _ = _step_times(model, optimizer, big, device, autocast, repeats)
                    big = None
                except torch.cuda.OutOfMemoryError:
                    say(f"  batch {size}: out of memory")
                    big = None
                    optimizer.zero_grad(set_to_none=True)
                    break
                peaks[size] = peak_b
                if peak_b is not None and peak_b > TRAIN_MEMORY_LIMIT_BYTES:
                    say(f"  batch {size}: peak {peak_b / GB:.1f} GB, over {TRAIN_MEMORY_LIMIT_BYTES / GB:.0f} GB")
                    break
                rates[size] = size / median(times_b)
            best = max(rates, key=rates.get)
            out.values["gpu_train_samples_per_s_best"] = rates[best]
            out.details["gpu_train_samples_per_s_best"] = {
                **common, "best_batch_size": best, "samples_per_s_by_batch": rates,
                "peak_gb_by_batch": {k: None if v is None else v / GB for k, v in peaks.items()},
                "memory_limit_gb": TRAIN_MEMORY_LIMIT_BYTES / GB}
            # Gradient checkpointing, batch 2 (as train_ddp.py --gradient_checkpointing).
            model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.vlm.enable_input_require_grads()
            times_c, peak_c, _ = _step_times(model, optimizer, batch, device, autocast, repeats)
            if peak_c is not None:
                out.values["gpu_train_peak_gb_b2_ckpt"] = peak_c / GB
                out.details["gpu_train_peak_gb_b2_ckpt"] = {**common, "peak_bytes": peak_c, "step_times_s": times_c}
        finally:
            model = optimizer = None  # the closures above hold them through these names
            free_memory(device)

    def published() -> None:
        model = build_for_training(spec, sam_variant, device, dtype, processor, published=True)
        optimizer = build_optimizer(model, 3e-4, 0.0, (0.9, 0.95))
        try:
            batch = training_batch(model, settings.seed, batch_size=2, turns=3)
            losses["published"] = _initial_loss(model, batch, autocast)
            times, peak, _ = _step_times(model, optimizer, batch, device, autocast, repeats)
            steps["published"] = median(times)
            loss_diff = abs(losses["ours"] - losses["published"])
            ok = bool(np.isfinite(loss_diff) and loss_diff <= 2e-2 * max(1.0, abs(losses["ours"])))
            out.values["gpu_train_vs_published_step"] = steps["published"] / steps["ours"]
            out.details["gpu_train_vs_published_step"] = {
                **common, "ours_s": steps["ours"], "published_s": steps["published"], "times_published_s": times,
                "peak_gb": {"ours": out.values.get("gpu_train_peak_gb_b2"),
                            "published": None if peak is None else peak / GB},
                "check": f"same weights and batch: loss before training {losses['ours']:.4f} vs "
                         f"{losses['published']:.4f}", "check_passed": ok,
                "ours_is": "train_ddp.py's defaults: LoRA + [SEG] rows, SAM SDPA attention (compiled on CUDA, "
                           "--compile_sam), no gradient checkpointing",
                "published_is": "LoRA + whole embed_tokens and lm_head + mask decoder, SAM official attention, "
                                "no gradient checkpointing"}
        finally:
            model = optimizer = None  # the closures above hold them through these names
            free_memory(device)

    out.attempt(("gpu_train_step_b2_s", "gpu_train_samples_per_s_best", "gpu_train_peak_gb_b2",
                 "gpu_train_peak_gb_b2_ckpt"), ours, say)
    if on_update is not None:
        on_update(out.as_dict())
    if "ours" in steps:
        out.attempt(("gpu_train_vs_published_step",), published, say)
    else:
        out.errors.setdefault("gpu_train_vs_published_step", "our step was not measured")
    return out.as_dict()
