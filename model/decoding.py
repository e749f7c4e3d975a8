"""Greedy decoding with a static KV cache, a compiled step, and reuse of an image's prefix.

Why our own loop
----------------
On a GPU, eager decoding of a 7B Qwen-VL is bound by kernel launches, not by the GPU: one token
takes 20-23 ms on an H200 where reading its 16.6 GB of weights takes 3.5-3.9 ms (measured
2026-11-29; README, Performance). A static KV cache gives every decoding step the same shapes, so
the step can be compiled once and replayed as a CUDA graph (``torch.compile(mode="reduce-overhead")``). A
replay overwrites the tensors the previous replay returned, so the ``[SEG]`` state of each step
must be copied out before the next one: a loop we own does that explicitly (transformers'
``generate`` collects per-step outputs without copying them).

Modes (``decoding=``, see :data:`DECODING_MODES`)
-------------------------------------------------
* ``"compiled"``: this loop, its step compiled with CUDA graphs. The first step of each shape
  (batch size, cache length) pays the compile (:attr:`GreedyDecoder.compile_seconds`); a process
  that answers many requests pays it once per shape, and cache lengths are rounded up to
  :data:`CACHE_LENGTH_STEP` so there are few shapes. A compile failure falls back to ``"eager"``
  with a warning; a shape beyond :data:`MAX_COMPILED_SHAPES` decodes eagerly (the shapes already
  compiled stay compiled).
* ``"eager"``: the same loop and maths without compiling (what a CPU runs).
* ``"transformers"``: transformers' ``generate`` with its dynamic cache: the reference the tests
  compare against, and the path for options this loop does not take (sampling, beams).
* ``"auto"``: ``"compiled"`` on CUDA, ``"eager"`` elsewhere.

Positions
---------
Qwen-VL's rotary positions are 3-D (temporal, height, width) over the image and equal for text.
Every token after the last image has position ``index + rope_delta`` (one delta per row, computed
by the model's ``get_rope_index`` during the prompt's forward pass, counted over the row's real,
unpadded tokens), so the k-th generated token of a left-padded row sits at
``real_prompt_tokens + rope_delta + k``. The loop passes these positions explicitly, which keeps
the step free of the model's data-dependent position code.

Follow-up questions (:class:`PrefixCache`)
------------------------------------------
A request of one image is ``system + image + question``. The keys and values of everything up
to the last image token do not depend on the question, so they are kept (with the row's
``rope_delta``), keyed by a hash of exactly those tokens and the image's patches, and by the
model's dtype and device. A next question about the same image copies them into the cache and
runs the language model only over the question's tokens: neither the vision tower nor the image's
hundreds of tokens run again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .constants import DECODING_MODES
from .image_cache import tensor_key
from .lru import LRU

logger = logging.getLogger(__name__)

CACHE_LENGTH_STEP = 256
"""Static caches are sized in multiples of this many tokens, so that prompts of different lengths
share a compiled step (each distinct (batch, length) shape is compiled once)."""
MAX_COMPILED_SHAPES = 64
"""Compiled variants of the decoding step (one per (batch, cache length) shape, over every decoder
of the process) before new shapes decode eagerly. torch's own limit (``recompile_limit``, 8) would
make the ninth shape fail to compile; each variant costs its compile time and, on CUDA, its graph."""


def resolve_decoding(mode: str, device: torch.device) -> str:
    """The concrete mode ``mode`` stands for on ``device`` (``"auto"`` -> compiled on CUDA)."""
    if mode not in DECODING_MODES:
        raise ValueError(f"decoding={mode!r}: choose one of {', '.join(DECODING_MODES)}")
    if mode == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "eager"
    return mode


def causal_lm(vlm: nn.Module) -> nn.Module:
    """The ``*ForConditionalGeneration`` inside ``vlm`` (unwrapping a peft model; LoRA layers stay)."""
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


@dataclass
class Decoded:
    """Greedy decoding output.

    Attributes:
        tokens: [B, N] generated token ids, N <= max_new_tokens; a row that stopped early goes on
            with arbitrary tokens after its stop token (callers cut at the first stop token).
        states: [B, N + 1, H] final (post-norm) hidden states, in sequence order: ``states[:, 0]``
            the prompt's last one (it chose ``tokens[:, 0]``), ``states[:, j + 1]`` that of the step
            that consumed ``tokens[:, j]``. A ``[SEG]`` at j is stood for by ``states[:, j + 1 +
            offset]`` (:data:`model.constants.SEG_STATES`). Zero where not computed (after the last
            step).
    """

    tokens: torch.Tensor
    states: torch.Tensor


@dataclass
class _Prefix:
    length: int
    keys: list[torch.Tensor]  # per layer [1, kv_heads, length, head_dim]
    values: list[torch.Tensor]
    rope_delta: torch.Tensor  # [1, 1]


def prefixes_reusable(vlm: nn.Module) -> bool:
    """Whether a Qwen-VL's image prefixes can be reused (:class:`PrefixCache`): not with a
    sliding-window layer, which keeps only its last tokens (``_prefill`` checks the cache itself)."""
    text_config = getattr(vlm.config, "text_config", vlm.config)
    return "sliding_attention" not in (getattr(text_config, "layer_types", None) or ())


class PrefixCache(LRU[str, _Prefix]):
    """LRU store of image prefixes' keys and values, for follow-up questions (see the module doc).

    Only single-request batches use it. Memory per entry: layers x 2 x kv_heads x head_dim x
    prefix tokens x bytes; for Qwen2.5-VL-7B in bf16 (28 x 2 x 4 x 128 x 2 bytes = 57 KB a token)
    and a 640x480 image (about 420 prefix tokens) that is 24 MB. Use one store per model.
    ``stats`` counts the lookups that found a prefix (``"hits"``) and those that did not.

    Args:
        max_items: prefixes kept (0 disables storing).
    """

    def __init__(self, max_items: int = 4) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        super().__init__(max_items)
        self.stats = {"hits": 0, "misses": 0}

    def get(self, key: str) -> _Prefix | None:
        prefix = super().get(key)
        self.stats["hits" if prefix is not None else "misses"] += 1
        return prefix


def image_prefix_length(inputs: dict) -> int:
    """Tokens up to and including the last image token of a one-row batch (0: no image)."""
    token_types = inputs.get("mm_token_type_ids")
    if token_types is None or inputs.get("pixel_values") is None or inputs["input_ids"].shape[0] != 1:
        return 0
    image_positions = token_types[0].nonzero()
    return int(image_positions[-1]) + 1 if len(image_positions) else 0


class GreedyDecoder:
    """Greedy decoding of a Qwen-VL with a static KV cache, optionally compiled.

    Args:
        vlm: the Qwen-VL (a peft model or a plain ``*ForConditionalGeneration``).
        compiled: compile the decoding step (CUDA graphs on CUDA).
        max_caches: static caches kept for reuse when compiled (one per batch size and length;
            a compiled step is tied to its cache's tensors). Eager decoding keeps the last one
            only: a new one costs an allocation, a kept one its memory (at 7B, 57 KB per token
            and row: 0.8 GB for 8 rows of 1,792 tokens).
    """

    def __init__(self, vlm: nn.Module, compiled: bool = False, max_caches: int = 4) -> None:
        self.lm = causal_lm(vlm)
        self.compiled = compiled
        self.max_caches = max_caches
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.eager_shapes: set[tuple[int, int]] = set()  # met beyond MAX_COMPILED_SHAPES
        self._caches: LRU[tuple[int, int], object] = LRU(max_caches)
        self._compiled_step: Callable | None = None

    @torch.no_grad()
    def decode(
        self,
        inputs: dict,
        max_new_tokens: int,
        stop_ids: Iterable[int],
        logits_processor: Callable | None = None,
        prefix_cache: PrefixCache | None = None,
        image_keys: Sequence[str | None] | None = None,
    ) -> Decoded:
        """Greedy-decode up to ``max_new_tokens`` tokens after a left-padded prompt.

        Args:
            inputs: the VLM's keyword inputs (``input_ids`` [B, T], ``attention_mask`` [B, T],
                ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ...).
            stop_ids: tokens that end an answer; decoding stops when every row has produced one.
            logits_processor: called as ``processor(sequence [B, t], scores [B, V]) -> scores``
                before each choice (transformers' ``LogitsProcessorList`` works).
            prefix_cache: reuse (and store) the image prefix of a one-request batch.
            image_keys: the batch's ``image_keys`` (:func:`model.batch.image_key`, from a
                FeatureCache's preprocessing): the prefix is then keyed on them, not on a hash of
                ``pixel_values`` (megabytes, copied back from the device to be hashed).
        """
        input_ids = inputs["input_ids"]
        batch_size, prompt_length = input_ids.shape
        device = input_ids.device
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache_length = -(-(prompt_length + max_new_tokens + 1) // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
        cache = self._cache(batch_size, cache_length)
        # Beyond the prompt every slot is a (future) real token; causality hides the ones not yet written.
        full_mask = torch.ones((batch_size, cache_length), dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt_length] = attention_mask

        hidden, rope_delta = self._prefill(inputs, attention_mask, cache, prefix_cache, image_keys)
        logits = self.lm.lm_head(hidden).float()
        first_positions = attention_mask.sum(dim=1) + rope_delta.view(-1).to(device)

        # Prompt and answer in one buffer: a logits processor sees ``sequence[:, :prompt + step]``
        # as a view, with no concatenation (one more kernel launch) per token.
        sequence = torch.cat([input_ids, input_ids.new_zeros((batch_size, max_new_tokens))], dim=1)
        tokens = sequence[:, prompt_length:]
        states = hidden.new_zeros((batch_size, max_new_tokens + 1, hidden.shape[-1]))
        states[:, 0] = hidden
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        all_stopped = StopFlags(device)
        steps = 0
        for step in range(max_new_tokens):
            token = self._choose(logits, sequence[:, : prompt_length + step], logits_processor)
            tokens[:, step] = token
            steps = step + 1
            finished |= torch.isin(token, stop)
            if all_stopped(finished):
                break
            positions = (first_positions + step).view(1, batch_size, 1).expand(3, batch_size, 1)
            logits, hidden = self._decode_step(token[:, None], positions, full_mask, cache)
            # Copy out before the next step: under CUDA graphs the next replay reuses this memory.
            states[:, step + 1] = hidden
        return Decoded(tokens[:, :steps], states[:, : steps + 1])

    # ------------------------------------------------------------------ the prompt

    def _prefill(self, inputs, attention_mask, cache, prefix_cache, image_keys=None):
        """Run the prompt into ``cache``; returns ([B, H] last states, [B, 1] rope deltas)."""
        # A sliding-window layer keeps only its last tokens: its prefix cannot be copied back.
        reusable = (
            prefix_cache is not None and prefix_cache.max_items > 0
            and not any(getattr(layer, "is_sliding", False) for layer in cache.layers)
        )
        prefix_length = image_prefix_length(inputs) if reusable else 0
        key = None
        if prefix_length:
            # With the model's dtype and device: a prefix computed before a model.to(...) fits no cache of it.
            if image_keys is not None and all(image_key is not None for image_key in image_keys):
                key = tensor_key(inputs["input_ids"][:, :prefix_length]) + "|image:" + ",".join(image_keys)
            else:
                key = tensor_key(inputs["input_ids"][:, :prefix_length], inputs["pixel_values"], inputs.get("image_grid_thw"))
            key += f"|{self.lm.dtype}|{inputs['input_ids'].device}"
            prefix = prefix_cache.get(key)
            if prefix is not None and prefix.length < inputs["input_ids"].shape[1]:
                return self._prefill_after(prefix, inputs, attention_mask, cache), prefix.rope_delta
        output = self.lm.model(**inputs, cache=cache, use_cache=True)
        rope_delta = getattr(self.lm.model, "rope_deltas", None)
        if rope_delta is None or inputs.get("image_grid_thw") is None:
            rope_delta = torch.zeros((inputs["input_ids"].shape[0], 1), dtype=torch.long)
        if key is not None:
            layers = cache.layers
            prefix_cache.put(key, _Prefix(
                length=prefix_length,
                keys=[layer.keys[:, :, :prefix_length].clone() for layer in layers],
                values=[layer.values[:, :, :prefix_length].clone() for layer in layers],
                rope_delta=rope_delta.clone(),
            ))
        return output.last_hidden_state[:, -1], rope_delta

    def _prefill_after(self, prefix: _Prefix, inputs, attention_mask, cache) -> torch.Tensor:
        """Load ``prefix`` into ``cache`` and run only the tokens after it (text: no vision)."""
        for layer, keys, values in zip(cache.layers, prefix.keys, prefix.values):
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys[:, :, : prefix.length].copy_(keys)
            layer.values[:, :, : prefix.length].copy_(values)
            layer.cumulative_length.fill_(prefix.length)
        input_ids = inputs["input_ids"]
        rest = input_ids[:, prefix.length :]
        positions = torch.arange(prefix.length, input_ids.shape[1], device=input_ids.device) + prefix.rope_delta.to(input_ids.device)
        output = self.lm.model(
            input_ids=rest,
            attention_mask=attention_mask,
            position_ids=positions.view(1, 1, -1).expand(3, 1, -1),
            cache=cache,
            use_cache=True,
        )
        return output.last_hidden_state[:, -1]

    # ------------------------------------------------------------------ one token

    def _forward_step(self, token, positions, attention_mask, cache):
        """[B, 1] token at [3, B, 1] positions -> ([B, V] float32 logits, [B, H] final state)."""
        output = self.lm.model(
            input_ids=token, position_ids=positions, attention_mask=attention_mask, cache=cache, use_cache=True
        )
        hidden = output.last_hidden_state[:, -1]
        return self.lm.lm_head(hidden).float(), hidden

    def _decode_step(self, token, positions, attention_mask, cache):
        shape = tuple(attention_mask.shape)
        if not self.compiled or shape in self.eager_shapes:
            return self._forward_step(token, positions, attention_mask, cache)
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._forward_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # The previous step's outputs are dead (copied out): the next replay may reuse their memory.
        torch.compiler.cudagraph_mark_step_begin()
        if shape in self.compile_seconds:  # compiled already: no recompile, so no limit to lift
            return self._compiled_step(token, positions, attention_mask, cache)
        logger.info("compiling the decoding step for batch %d, cache %d (once per shape; --decoding eager skips it)", *shape)
        start = time.perf_counter()
        try:
            logits, hidden = self._run_compiled(shape, token, positions, attention_mask, cache)
        except Exception as error:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            logger.warning("compiling the decoding step failed (%s: %s); decoding eagerly from now on",
                           type(error).__name__, error)
            self.compiled = False
            raise _CompileFailed from error
        if token.device.type == "cuda":
            torch.cuda.synchronize(token.device)
        if shape not in self.eager_shapes:
            self.compile_seconds[shape] = time.perf_counter() - start
            logger.info("compiled the decoding step for batch %d, cache %d in %.1f s", *shape, self.compile_seconds[shape])
        return logits, hidden

    def _run_compiled(self, shape, token, positions, attention_mask, cache):
        """The compiled step's first call for ``shape`` (it compiles); past
        :data:`MAX_COMPILED_SHAPES` variants, ``shape`` runs eagerly."""
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            # A new shape is a recompile: allow one per shape we are willing to compile.
            with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES):
                return self._compiled_step(token, positions, attention_mask, cache)
        except FailOnRecompileLimitHit:  # raised before the step ran: nothing was written to the cache
            logger.warning(
                "the decoding step is compiled for %d shapes already (MAX_COMPILED_SHAPES); batch %d, cache %d "
                "decodes eagerly", MAX_COMPILED_SHAPES, *shape,
            )
            self.eager_shapes.add(shape)
            return self._forward_step(token, positions, attention_mask, cache)

    @staticmethod
    def _choose(logits, sequence, logits_processor) -> torch.Tensor:
        if logits_processor is not None:
            logits = logits_processor(sequence, logits)
        return logits.argmax(dim=-1)

    def _cache(self, batch_size: int, length: int):
        from transformers import StaticCache

        key = (batch_size, length)
        cache = self._caches.get(key)
        if cache is None:
            cache = StaticCache(config=self.lm.config, max_cache_len=length)
            # Read at each new cache, not once: a failed compile turns ``compiled`` off for good.
            self._caches.max_items = self.max_caches if self.compiled else 1
            self._caches.put(key, cache)
        else:
            cache.reset()
        return cache


class StopFlags:
    """Whether every row of a batch has stopped, asked once per decoding step.

    On a CPU the answer is read at once. On CUDA, reading it at once would stall the decoding: the
    host would wait for the device to finish the step, then the device for the host to launch the
    next one (launching a compiled step takes the host about a millisecond on the H200 machine:
    dynamo's guards, the CUDA-graph replay, the loop's own operations; profiled 2026-11-30). So
    each step copies its flag to pinned host memory behind an event, and the loop reads the flag
    of the step before, after launching this one: the device always has a step queued, and the
    decoding runs one step past the last stop (the callers cut each row at its first stop token,
    so that step changes no answer).
    """

    def __init__(self, device: torch.device, lagged: bool | None = None) -> None:
        """``lagged``: read the step before's flag (default: on CUDA)."""
        self.device = torch.device(device)
        self.lagged = self.device.type == "cuda" if lagged is None else lagged
        self._previous: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def __call__(self, finished: torch.Tensor) -> bool:
        """``finished`` [B] bool on the device, this step's: True once every row has stopped (as of
        this step, or of the step before when lagged)."""
        if not self.lagged:
            return bool(finished.all())
        on_cuda = self.device.type == "cuda"
        flag = torch.empty((), dtype=torch.bool, pin_memory=on_cuda)
        flag.copy_(finished.all(), non_blocking=on_cuda)
        event = torch.cuda.Event() if on_cuda else None
        if event is not None:  # on the stream the copy is queued on: that of the flag's device
            event.record(torch.cuda.current_stream(self.device))
        previous, self._previous = self._previous, (flag, event)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()  # queued before the step now running: no wait for that step
        return bool(previous[0])


class _CompileFailed(RuntimeError):
    """The compiled step could not be built; the caller decodes the request again eagerly."""


def greedy_decode(decoder: GreedyDecoder, inputs: dict, max_new_tokens: int, stop_ids, **options) -> Decoded:
    """:meth:`GreedyDecoder.decode`, redone eagerly if compiling the step fails."""
    try:
        return decoder.decode(inputs, max_new_tokens, stop_ids, **options)
    except _CompileFailed:
        return decoder.decode(inputs, max_new_tokens, stop_ids, **options)
