"""How many image tokens an image becomes, and the pixel limits that bound it.

Qwen's image processor resizes each image (aspect kept) so that both sides are multiples of
``patch_size * merge_size`` and ``min_pixels <= height * width <= max_pixels`` (transformers'
``smart_resize``); every ``(patch_size * merge_size)^2`` pixels of the result become one image
token of the language model's input: 28x28 pixels for Qwen2-VL and Qwen2.5-VL (patch 14, merge 2),
32x32 for Qwen3-VL (patch 16, merge 2). The checkpoints ship very wide limits (Qwen2.5-VL's
``preprocessor_config.json``: min_pixels 3,136, max_pixels 12,845,056, i.e. up to 16,384 tokens; a
4000x3000 photo becomes 15,301 tokens), so every entry point caps them here:

* ``--min_pixels`` / ``--max_pixels`` (Qwen's names, in pixels) win when given;
* otherwise the model's saved values are used, with the maximum capped at
  :data:`DEFAULT_MAX_IMAGE_TOKENS` tokens (1,003,520 pixels for Qwen2/2.5-VL, 1,310,720 for
  Qwen3-VL).

Training applies the limits to the model's processor before any data is encoded, so every
checkpoint (and the merged directory made from it) saves them with its processor. This module
imports no transformers at load time (argument parsing stays fast).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


#: The default cap, in image tokens per image, whatever the checkpoint's processor allows:
#: ``max_pixels = 1280 x 28 x 28 = 1,003,520`` for Qwen2-VL / Qwen2.5-VL and
#: ``1280 x 32 x 32 = 1,310,720`` for Qwen3-VL. ``--max_pixels`` overrides it.
DEFAULT_MAX_IMAGE_TOKENS = 1280


@dataclass(frozen=True)
class PixelLimits:
    """The pixel limits a processor resizes images to, and what they mean in image tokens."""

    min_pixels: int
    max_pixels: int
    pixels_per_token: int  # (patch_size * merge_size) ** 2

    @property
    def max_tokens(self) -> int:
        """The most image tokens one image can become (smart_resize keeps h x w <= max_pixels)."""
        return self.max_pixels // self.pixels_per_token

    def describe(self) -> str:
        side = math.isqrt(self.pixels_per_token)
        return (
            f"min_pixels {self.min_pixels:,}, max_pixels {self.max_pixels:,} "
            f"(at most {self.max_tokens:,} image tokens per image, one per {side}x{side} pixels)"
        )


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def pixels_per_token(processor) -> int:
    """Pixels of the resized image per image token: ``(patch_size * merge_size) ** 2``."""
    image_processor = _image_processor(processor)
    return (int(image_processor.patch_size) * int(image_processor.merge_size)) ** 2


def default_max_pixels(processor) -> int:
    """The default cap in pixels for this processor: ``DEFAULT_MAX_IMAGE_TOKENS`` tokens."""
    return DEFAULT_MAX_IMAGE_TOKENS * pixels_per_token(processor)


def pixel_limits(processor) -> PixelLimits:
    """The limits ``processor`` applies now (``size`` = {shortest_edge: min, longest_edge: max})."""
    image_processor = _image_processor(processor)
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None)
    if not low or not high:
        raise ValueError(f"the image processor has no pixel limits (size={size!r})")
    return PixelLimits(int(low), int(high), pixels_per_token(image_processor))


def check_pixel_values(min_pixels: int | None, max_pixels: int | None, per_token: int | None = None) -> None:
    """Raise ``ValueError`` naming the flag when ``--min_pixels`` / ``--max_pixels`` are unusable.

    Both must be positive integers, ``min_pixels <= max_pixels``, and (when ``per_token`` is
    known) ``max_pixels`` must allow at least one image token.
    """
    for flag, value in (("--min_pixels", min_pixels), ("--max_pixels", max_pixels)):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if value is not None and (isinstance(value, bool) or not whole or value < 1):
            raise ValueError(f"{flag} must be a positive whole number of pixels, got {value!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"--min_pixels {min_pixels:,} is above --max_pixels {max_pixels:,}")
    if per_token is not None and max_pixels is not None and max_pixels < per_token:
        side = math.isqrt(per_token)
        raise ValueError(
            f"--max_pixels {max_pixels:,} is below one image token ({side}x{side} = {per_token:,} pixels "
            f"for this model): use at least {per_token:,}"
        )


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> PixelLimits:
    """Make ``processor`` resize every image to ``min_pixels..max_pixels`` pixels.

    transformers 5 keeps the limits in the image processor's ``size`` (``shortest_edge`` = min
    pixels, ``longest_edge`` = max pixels), which is what it resizes with and what
    ``save_pretrained`` writes; older versions also read ``min_pixels`` / ``max_pixels``
    attributes, set too where they exist.
    """
    from transformers.image_utils import SizeDict

    image_processor = _image_processor(processor)
    per_token = pixels_per_token(image_processor)
    check_pixel_values(min_pixels, max_pixels, per_token)
    image_processor.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, int(value))
    return PixelLimits(int(min_pixels), int(max_pixels), per_token)


def apply_pixel_limits(
    processor, min_pixels: int | None = None, max_pixels: int | None = None, *, cap_saved: bool = True
) -> PixelLimits:
    """Set the limits every entry point uses, and log them.

    A value given (``--min_pixels`` / ``--max_pixels``) wins. A value not given is the
    processor's own (what the checkpoint saved), but the maximum is capped at
    :data:`DEFAULT_MAX_IMAGE_TOKENS` tokens (``cap_saved=False``: not capped, e.g. when resuming
    a run whose values were chosen by flag); a saved minimum above the resulting maximum is
    lowered to it.

    Raises:
        ValueError: a value is not positive, ``min_pixels > max_pixels`` or ``max_pixels`` is
            below one image token; the message names the flag.
    """
    saved = pixel_limits(processor)
    check_pixel_values(min_pixels, max_pixels, saved.pixels_per_token)
    min_pixels = None if min_pixels is None else int(min_pixels)
    max_pixels = None if max_pixels is None else int(max_pixels)
    high = max_pixels
    if high is None:
        high = saved.max_pixels
        cap = default_max_pixels(processor)
        if cap_saved and high > cap:
            logger.info(
                "the checkpoint's image processor allows max_pixels %s (up to %s image tokens per image); "
                "capped at %s (%s tokens); pass --max_pixels to choose another limit",
                f"{high:,}", f"{high // saved.pixels_per_token:,}", f"{cap:,}", f"{DEFAULT_MAX_IMAGE_TOKENS:,}",
            )
            high = cap
    low = min_pixels
    if low is None:
        low = saved.min_pixels
        if low > high:
            logger.info("the checkpoint's min_pixels %s is above max_pixels %s: lowered to it", f"{low:,}", f"{high:,}")
            low = high
    elif low > high:
        raise ValueError(
            f"--min_pixels {low:,} is above the max_pixels in use ({high:,}"
            f"{'' if max_pixels is not None else ', the checkpoint value capped at the default'}): "
            "lower --min_pixels or raise --max_pixels"
        )
    limits = set_pixel_limits(processor, low, high)
    logger.info("Qwen image processor: %s", limits.describe())
    return limits


def image_token_counts(image_grid_thw, merge_size: int) -> list[int]:
    """Image tokens per image in the language model's input: ``t * h * w / merge_size^2``.

    Args:
        image_grid_thw: [N, 3] (the processor's output; one row per image).
        merge_size: the image processor's ``merge_size`` (2 for every Qwen-VL).
    """
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else list(image_grid_thw)
    return [int(t) * int(h) * int(w) // (merge_size**2) for t, h, w in rows]

