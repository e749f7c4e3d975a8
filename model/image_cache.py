"""Running the vision encoders once per image across requests: :class:`FeatureCache`.

(Within one batch whose rows share an image, :func:`model.shared_images.shared_images` runs the
vision tower once per distinct image.)

Each request re-runs two vision encoders: SAM's image encoder (the segmenter's
:meth:`~model.segmenter.ReasonSegmenter.encode_images`) and Qwen-VL's vision tower (its
``visual`` module, during the prompt's forward pass). For a follow-up question about the same
image both give the same output, so :class:`FeatureCache` memoises them:

* SAM: per image, keyed by a hash of that image's SAM input (``sam_pixel_values[i]``, uint8, and
  its size inside the padded input);
  several images in a batch are looked up one by one and only the missing ones are encoded.
* Qwen-VL: per call of the vision tower, keyed by a hash of ``pixel_values`` and
  ``image_grid_thw`` (the whole batch's patches: a batch of one image is the common case).
* The preprocessing itself (:func:`model.batch.prepare_image`: Qwen's image processor and SAM's
  resize, 38 ms of CPU for a 640x480 image on the H200 machine), through ``model.prepare``,
  keyed by :func:`model.batch.image_key` (the image's pixels and the preprocessing settings).
  The samples it makes carry that key (``image_keys`` in a batch), and SAM's store and the image
  prefix cache (:class:`model.decoding.PrefixCache`) key on it instead of hashing the larger
  model inputs again (and copying them back from the GPU to do so).

The keys are hashes of the exact model inputs, or of what determines them, so a cached feature is
returned only for an input that would have produced it; the stores are LRU-bounded (``max_items``
entries each: at Qwen2.5-VL's 1,280-token cap a preprocessed image holds about 27 MB). Caching is
only active inside the context (or between :meth:`FeatureCache.attach` and
:meth:`FeatureCache.detach`). The vision tower's outputs are cached only without autograd
(inference). SAM's embeddings are cached in inference, and in training too when the cache is
built with ``training=True`` (``train_ddp.py --sam_feature_cache N``; SAM only): SAM's image encoder is
frozen in training, so an image's embedding is the same at every step, and a training set that
shows the same pictures again (over epochs, or one photo in several sources) encodes each once.

Usage::

    with FeatureCache(max_items=8).attached(model) as cache:
        model.predict([image], ["Where is the dog?"])
        model.predict([image], ["And its tail?"])   # neither encoder runs again
        cache.stats  # {"sam_hits": 1, "sam_misses": 1, "vision_hits": 1, "vision_misses": 1,
                     #  "image_hits": 1, "image_misses": 1}
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .lru import LRU

logger = logging.getLogger(__name__)

_MISSING = object()


def tensor_key(*tensors: torch.Tensor | None) -> str:
    """A content hash of tensors (dtype, shape and bytes); ``None`` entries count as absent."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1)
        digest.update(f"{data.dtype}{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def _fresh(output: Any) -> Any:
    """A shallow copy of a vision-tower output: callers reassign its fields (e.g. Qwen's
    ``get_image_features`` splits ``pooler_output`` in place), which must not touch the cache."""
    from transformers.utils import ModelOutput

    if isinstance(output, ModelOutput):
        return type(output)(**{k: list(v) if isinstance(v, list) else v for k, v in output.items()})
    if isinstance(output, tuple):
        return tuple(list(v) if isinstance(v, list) else v for v in output)
    return output


def find_vision_tower(vlm: nn.Module) -> nn.Module:
    """Qwen-VL's vision tower: the module named ``visual`` (also inside a peft wrapper)."""
    for name, module in vlm.named_modules():
        if name == "visual" or name.endswith(".visual"):
            return module
    raise ValueError("could not find the Qwen-VL vision tower (a module named 'visual')")


class FeatureCache:
    """LRU memo of SAM image embeddings and Qwen-VL vision-tower outputs (see the module doc).

    Args:
        max_items: entries kept per encoder (0 disables storing).
        training: a cache for training: SAM's embeddings are served while the model is in training
            mode too (its image encoder is frozen), and the vision tower is left alone (its outputs
            are large at real size, and in training it runs with autograd anyway). Without it, a
            model in training mode encodes every time.
        vision: keep the vision tower's outputs. A caller that reuses image prefixes
            (:class:`model.decoding.PrefixCache`, as :class:`utils.inference.InferenceSession`
            does) turns it off: a follow-up then never runs the tower, and each first request
            would hash megabytes of pixels and hold an output for nothing.
    """

    def __init__(self, max_items: int = 8, training: bool = False, vision: bool = True) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.max_items = max_items
        self.training = training
        self.vision = vision and not training
        self._sam: LRU[str, torch.Tensor] = LRU(max_items)
        self._vision: LRU[str, Any] = LRU(max_items)
        self._images: LRU[str, Any] = LRU(max_items)  # model.batch.ImageInputs
        self._lock = threading.RLock()
        self._model: nn.Module | None = None
        self._visual: nn.Module | None = None
        self._saved_encode: Any = _MISSING
        self._saved_forward: Any = _MISSING
        self._saved_prepare: Any = _MISSING
        self.stats = {"sam_hits": 0, "sam_misses": 0, "vision_hits": 0, "vision_misses": 0,
                      "image_hits": 0, "image_misses": 0}

    # ------------------------------------------------------------------ attach / detach

    def attach(self, model: nn.Module) -> "FeatureCache":
        """Route ``model.encode_images`` (and, unless ``training``, ``model.prepare`` and its vision
        tower's forward) through the cache."""
        if self._model is not None:
            raise RuntimeError("this FeatureCache is already attached to a model")
        if getattr(model.__dict__.get("encode_images"), "feature_cache", None) is not None:
            # Detaching either of two stacked caches would unhook the other one too.
            raise RuntimeError(
                "the model already has a FeatureCache attached (another InferenceSession?); close that "
                "session (or detach that cache) first: one at a time per model"
            )
        self._saved_encode = model.__dict__.get("encode_images", _MISSING)
        model.encode_images = self._wrap_encode(model.encode_images, model)
        self._model = model
        if not self.training:
            self._saved_prepare = model.__dict__.get("prepare", _MISSING)
            model.prepare = self._wrap_prepare(model.prepare, model)
        if self.vision:
            visual = find_vision_tower(model.vlm)
            self._saved_forward = visual.__dict__.get("forward", _MISSING)
            visual.forward = self._wrap_vision(visual.forward)
            self._visual = visual
        return self

    def detach(self) -> None:
        """Restore the model's own methods (the stored features are kept until :meth:`clear`)."""
        if self._model is None:
            return
        for module, name, saved in (
            (self._model, "encode_images", self._saved_encode),
            (self._model if not self.training else None, "prepare", self._saved_prepare),
            (self._visual, "forward", self._saved_forward),
        ):
            if module is None:
                continue
            if saved is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, saved)
        self._model = self._visual = None

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["FeatureCache"]:
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def clear(self) -> None:
        with self._lock:
            self._sam.clear()
            self._vision.clear()
            self._images.clear()

    def __len__(self) -> int:
        return len(self._sam) + len(self._vision) + len(self._images)

    # ------------------------------------------------------------------ the wrappers

    def _wrap_prepare(self, prepare: Callable[..., dict], model: nn.Module) -> Callable:
        # Not at the top: model.batch imports transformers, and the inference CLI imports this module
        # (through model.decoding) before parsing its arguments.
        from .batch import image_key, prepare_image
        from .sam import as_rgb_uint8

        def cached_prepare(image, turns, masks=(), **extra) -> dict:
            image = as_rgb_uint8(image)  # once, not in each of the calls below
            key = image_key(model.processor, model.sam_transform, image)
            with self._lock:
                inputs = self._images.get(key, _MISSING)
                self.stats["image_hits" if inputs is not _MISSING else "image_misses"] += 1
            if inputs is _MISSING:
                inputs = prepare_image(model.processor, model.sam_transform, image, key)
                if self.max_items:
                    with self._lock:
                        self._images.put(key, inputs)
            return prepare(image, turns, masks, image_inputs=inputs, **extra)

        return cached_prepare

    def _wrap_encode(self, encode: Callable[..., torch.Tensor], model: nn.Module) -> Callable:
        def encode_images(sam_pixel_values: torch.Tensor, input_sizes, image_keys=None) -> torch.Tensor:
            if model.training and not self.training:
                return encode(sam_pixel_values, input_sizes)
            # An embedding is of the encoder's dtype and device: one made before a model.to(...)
            # is not served after it.
            weight = model.sam.image_encoder.patch_embed.proj.weight
            where = f"|{weight.dtype}|{weight.device}"
            with self._lock:
                if image_keys is not None and all(key is not None for key in image_keys):
                    keys = [f"image:{key}{where}" for key in image_keys]  # made in prepare: no hash of the input
                else:
                    keys = [f"{tensor_key(image)}{tuple(size)}{where}" for image, size in zip(sam_pixel_values, input_sizes)]
                found = {key: self._sam.get(key, _MISSING) for key in dict.fromkeys(keys)}
                missing = [key for key, value in found.items() if value is _MISSING]
                self.stats["sam_hits"] += len(keys) - len(missing)
                self.stats["sam_misses"] += len(missing)
                if missing:
                    rows = [keys.index(key) for key in missing]
                    embeddings = encode(sam_pixel_values[rows], [input_sizes[row] for row in rows])
                    for key, embedding in zip(missing, embeddings):
                        found[key] = embedding
                        if self.max_items:
                            self._sam.put(key, embedding.clone())  # not a view that keeps the whole batch alive
                return torch.stack([found[key] for key in keys])

        encode_images.feature_cache = self  # marks the model as taken (see attach)
        return encode_images

    def _wrap_vision(self, forward: Callable) -> Callable:
        def cached_forward(hidden_states: torch.Tensor, *args, **kwargs):
            if torch.is_grad_enabled():
                return forward(hidden_states, *args, **kwargs)
            tensors = [hidden_states, *[a for a in args if isinstance(a, torch.Tensor)]]
            tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
            others = [repr(a) for a in args if not isinstance(a, torch.Tensor)]
            others += [f"{k}={kwargs[k]!r}" for k in sorted(kwargs) if not isinstance(kwargs[k], torch.Tensor)]
            key = tensor_key(*tensors) + "|" + ",".join(others)
            with self._lock:
                output = self._vision.get(key, _MISSING)
                if output is not _MISSING:
                    self.stats["vision_hits"] += 1
                    return _fresh(output)
                self.stats["vision_misses"] += 1
                output = forward(hidden_states, *args, **kwargs)
                if self.max_items:
                    self._vision.put(key, _fresh(output))
                return output

        return cached_forward
