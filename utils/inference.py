"""Inference for people: reading images, answering requests, describing and saving the answers.

Shared by ``inference.py`` (its three ways of answering are in :mod:`utils.inference_cli`) and the
Gradio demo (``tools/app.py``). Masks, boxes, RLE and overlays come from :mod:`utils.masks`; the model work
from :class:`model.segmenter.ReasonSegmenter`.

Bad input never stops a loop, a batch or the demo: it raises :class:`InputError` with a message
meant for the person (the file it names and what is wrong), which the caller shows and moves on.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.constants import SEG_TOKEN
from model.lru import LRU
from utils.grounding import answer_objects, resize_mask
from utils.masks import overlay_masks

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIDE = 4096
# Refused beyond this (a 150-megapixel image is 450 MB of RGB); PIL itself refuses ~179 MP.
DEFAULT_MAX_IMAGE_PIXELS = 150_000_000
NO_MASK_MESSAGE = f"no mask: the answer has no {SEG_TOKEN}"


class InputError(ValueError):
    """A request the model cannot take (unreadable image, empty prompt...); the message says why."""


# ---------------------------------------------------------------------------------------------
# Images and prompts
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """A decoded image: ``array`` is HxWx3 uint8 RGB, upright (EXIF orientation applied).

    Attributes:
        name: a short name for output files (the file's stem, or "image").
        source: where it came from (a path, or a description).
        resized_from: (H, W) of the original, upright image when ``array`` is smaller (a downscale
            to ``max_side``, or a reduced decode of a large JPEG); None when it is the original.
    """

    array: np.ndarray
    name: str = "image"
    source: str = "image"
    resized_from: tuple[int, int] | None = None


MIN_DECODED_SIDE = 1024
"""A reduced decode (:func:`load_image`'s ``model_inputs``) keeps at least this longest side: the
overlays people look at are drawn on the decoded image."""


@dataclass(frozen=True)
class ModelInputSizes:
    """How the two models resize an image: Qwen-VL's pixel limits and resize factor (patch size x
    merge size), SAM's input side (:meth:`same_from` tells whether a smaller copy of an image
    gives both models inputs of the same sizes, each made by shrinking)."""

    min_pixels: int
    max_pixels: int
    factor: int
    sam_side: int

    @classmethod
    def for_processor(cls, processor, sam_side: int) -> "ModelInputSizes":
        """The sizes of a Qwen-VL ``processor`` at its pixel limits now, and SAM at ``sam_side``."""
        from model.image_tokens import pixel_limits

        limits = pixel_limits(processor)
        factor = round(limits.pixels_per_token**0.5)  # (patch size x merge size) ** 2 pixels per token
        return cls(limits.min_pixels, limits.max_pixels, factor, sam_side)

    def of(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(Qwen-VL's resized (h, w), SAM's resized (h, w)) for a ``height`` x ``width`` image."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from model.sam import get_preprocess_shape

        qwen = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return tuple(qwen), get_preprocess_shape(height, width, self.sam_side)

    def same_from(self, whole: tuple[int, int], smaller: tuple[int, int]) -> bool:
        """Whether both models make inputs of the same sizes of a ``smaller`` (h, w) copy of an
        image as of the ``whole`` (h, w), neither enlarging the copy to get there (SAM enlarges
        any image to its side, so sizes alone would not tell)."""
        try:
            qwen, sam = self.of(*whole)
            same_sizes = self.of(*smaller) == (qwen, sam)
        except ValueError:  # Qwen-VL refuses the aspect (over 200:1): load_image says so, decoded whole
            return False
        return (
            same_sizes
            and smaller[0] >= qwen[0] and smaller[1] >= qwen[1]
            and max(smaller) >= min(self.sam_side, max(whole))
        )


MAX_ASPECT_RATIO = 200
"""Qwen-VL's image processors refuse a longer side more than this many times the shorter."""


def path_exists(text: str) -> bool:
    """Whether ``text`` names an existing file or directory; False for what names none (also "~nobody/x",
    or a line longer than a file name may be), rather than an error that would end the loop."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def load_image(
    source: str | os.PathLike | bytes | Image.Image | np.ndarray,
    max_side: int = DEFAULT_MAX_IMAGE_SIDE,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    model_inputs: ModelInputSizes | None = None,
) -> LoadedImage:
    """Decode an image with PIL, upright, as RGB; downscale it so its longest side is ``max_side``.

    Args:
        source: a file path, encoded bytes, a PIL image or an HxWx3 / HxW uint8 array.
        max_side: longer images are resized (aspect kept) and a message is logged; 0 disables.
        max_pixels: larger images (width x height as stored) are refused.
        model_inputs: how the models resize images. A JPEG file is then decoded at a reduced
            scale (its decoder's 1/2, 1/4 or 1/8) when both models make the same input sizes of
            the smaller image as of the whole one (after ``max_side``), and its longest side is
            still :data:`MIN_DECODED_SIDE`: a 4000x3000 photo at Qwen2.5-VL's 1,280 tokens is
            decoded at 2000x1500 in a third of the time, and all that follows runs on a quarter
            of the pixels. ``resized_from`` keeps the original size, in which
            :class:`InferenceSession` has the masks and boxes made (SAM's mask logits upsampled
            to it, as from the full image).
    Raises:
        InputError: missing or unreadable file, not an image, too many pixels.
    """
    name, label = "image", "the image"
    opened_here = False
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape[:2]:
            raise InputError(f"expected an HxWx3 uint8 RGB image, got {array.dtype} {tuple(array.shape)}")
        image = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
    elif isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            stream: Any = io.BytesIO(source)
        else:
            try:
                path = Path(source).expanduser()
            except RuntimeError as err:  # "~nobody/x.jpg": no such user
                raise InputError(f"image file {source}: {err}") from err
            name, label = path.stem or "image", str(path)
            if not path_exists(str(path)):
                raise InputError(f"image file {path} does not exist")
            if not path.is_file():
                raise InputError(f"{path} is not a file")
            stream = path
        # PIL refuses images over twice its own MAX_IMAGE_PIXELS (~179 MP) at open, so a
        # --max_image_pixels above that could never be used; ours is checked right below. Only
        # ever raised, never lowered: concurrent calls (the app's threads) cannot undo each other.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                # The pixel limit is checked below; PIL's own bomb warning is redundant.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except Image.DecompressionBombError as err:
            raise InputError(f"{label} is too large to decode safely ({err}); downscale it first (or raise --max_image_pixels)") from err
        except UnidentifiedImageError as err:
            raise InputError(f"{label} is not an image file that can be read (unknown or corrupt format)") from err
        except OSError as err:
            raise InputError(f"{label} could not be read (truncated or corrupt?): {err}") from err
        opened_here = True
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(_too_large(label, width, height, max_pixels))
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        orientation = 1
    upright = (width, height) if orientation not in (5, 6, 7, 8) else (height, width)
    if opened_here and image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with extra pictures
        request = _reduced_decode(width, height, max_side, model_inputs)
        if request is not None:
            image.draft("RGB", request)  # the decoder's reduced scale: faster, less memory
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{label} could not be decoded (truncated or corrupt?): {err}") from err
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block: keep the stored orientation
        logger.warning("%s: cannot apply its EXIF orientation (%s); using the image as stored", label, err)
        upright = (width, height)
    from utils.data.io import to_rgb  # here: utils.data loads torch, which --help must not wait for

    image = to_rgb(image)
    if max_side and max(upright) > max_side:
        if max(image.size) > max_side:  # not when a reduced decode made it smaller already
            image = image.resize(_kept_size(*upright, max_side), Image.BICUBIC, reducing_gap=2.0)
        logger.info(
            "%s is %dx%d; resized to %dx%d (longest side %d, see --max_image_side)",
            label, upright[0], upright[1], image.width, image.height, max_side,
        )
    resized_from = (upright[1], upright[0]) if image.size != upright else None
    array = np.asarray(image, dtype=np.uint8)
    height, width = array.shape[:2]
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InputError(f"{label} is {upright[0]}x{upright[1]}: Qwen-VL takes images up to {MAX_ASPECT_RATIO}:1; crop it")
    return LoadedImage(np.ascontiguousarray(array), name=name, source=label, resized_from=resized_from)


def _kept_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of an image once its longest side is at most ``max_side`` (0: no limit)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reduced_decode(
    width: int, height: int, max_side: int, model_inputs: ModelInputSizes | None
) -> tuple[int, int] | None:
    """The size to ask a JPEG decoder for (``draft``; it then decodes at 1/k, k the largest of 8,
    4, 2 whose result is at least that size), or None to decode every pixel.

    1/k is taken when the image it gives is at least what ``max_side`` keeps (it is resized to
    that after), or, with ``model_inputs``, when both models make the same input sizes of it as of
    the image ``max_side`` keeps, and its longest side is :data:`MIN_DECODED_SIDE` or more.
    """
    kept = _kept_size(width, height, max_side)
    for k in (8, 4, 2):
        if width // k < 1 or height // k < 1:
            continue
        decoded = (-(-width // k), -(-height // k))  # the decoder rounds up
        large_enough = decoded[0] >= kept[0] and decoded[1] >= kept[1]
        same_for_models = (
            model_inputs is not None and max(decoded) >= MIN_DECODED_SIDE
            and model_inputs.same_from((kept[1], kept[0]), (decoded[1], decoded[0]))
        )
        if large_enough or same_for_models:
            # Asking for w // k (not the size it gives) makes the decoder choose exactly 1/k.
            return width // k, height // k
    return None


def _too_large(label: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{label} is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
        f"{max_pixels / 1e6:.0f} megapixels; downscale it first (or raise --max_image_pixels)"
    )


def check_prompt(prompt: Any) -> str:
    """The request text, stripped; an empty one raises :class:`InputError`."""
    if prompt is None or not isinstance(prompt, str):
        raise InputError("the request is missing: type what to find or segment in the image")
    prompt = prompt.strip()
    if not prompt:
        raise InputError("the request is empty: type what to find or segment in the image")
    try:  # bytes that were not UTF-8, kept as lone surrogates (a terminal's stdin): the tokenizer would fail on them
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"the request is not UTF-8 text (character {err.start + 1}); type it again") from err
    return prompt


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One answered request.

    Attributes:
        result: the model's :class:`~model.segmenter.SegmentationResult` (text, masks, boxes...),
            its masks and boxes in pixels of the original image (the session asks for them at
            that size, also when the model saw a downscaled copy).
        image: the image the model saw (after any downscale; ``resized_from`` is the original size).
        features_reused: the image's encoded features came from the cache.
    """

    prompt: str
    image: LoadedImage
    result: Any
    features_reused: bool = False

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def masks(self) -> list[np.ndarray]:
        """Per ``[SEG]``, its mask in pixels of the original image."""
        return self.result.masks

    @property
    def boxes(self) -> list[tuple[int, int, int, int] | None]:
        """Per mask, its box in pixels of the original image."""
        return self.result.boxes

    @cached_property
    def seen_masks(self) -> list[np.ndarray]:
        """The masks in pixels of the image the model saw (``image.array``), to draw them on it."""
        height, width = self.image.array.shape[:2]
        return [mask if mask.shape == (height, width) else resize_mask(np.asarray(mask, dtype=bool), height, width)
                for mask in self.masks]

    @property
    def scores(self) -> list[float | None]:
        """Per mask, its confidence (mean mask probability inside it; None for an empty mask)."""
        return list(getattr(self.result, "scores", None) or [None] * len(self.masks))

    @property
    def image_tokens(self) -> int | None:
        """Image tokens the image became in the language model's input (None when unknown)."""
        return getattr(self.result, "image_tokens", None)

    def objects(self) -> list[dict]:
        """One object per ``[SEG]``: ``bbox_2d``, ``label``, ``score``, ``area``, ``mask`` (see
        :mod:`utils.grounding`), in pixels of the original image."""
        return answer_objects(self.text, self.masks, self.scores)

    def record(self) -> dict:
        """The answer as JSON (the schema of :mod:`utils.grounding`): prompt, text, objects, the
        original image's width and height, its image tokens, and the size the model saw when
        the image was downscaled."""
        height, width = self.image.resized_from or self.image.array.shape[:2]
        seen_height, seen_width = self.image.array.shape[:2]
        return {
            "prompt": self.prompt,
            "text": self.text,
            "objects": self.objects(),
            "width": int(width),
            "height": int(height),
            "image_tokens": self.image_tokens,
            "downscaled_to": {"width": int(seen_width), "height": int(seen_height)} if self.image.resized_from else None,
        }


def describe_box(box) -> str:
    return "empty mask (no box)" if box is None else f"box (x0, y0, x1, y1) = ({box[0]}, {box[1]}, {box[2]}, {box[3]})"


def describe_image(answer: Answer) -> str:
    """One line: the image's size (and the size the model saw, when downscaled) and the image
    tokens it became."""
    height, width = answer.image.resized_from or answer.image.array.shape[:2]
    seen = ""
    if answer.image.resized_from:
        seen = f" (seen downscaled to {answer.image.array.shape[1]}x{answer.image.array.shape[0]})"
    tokens = answer.image_tokens
    return f"image: {width}x{height}{seen}, " + (f"{tokens:,} image tokens" if tokens is not None else "image tokens unknown")


def describe(answer: Answer, saved: list[tuple[Path, Path]] | None = None) -> str:
    """What a person reads: the answer text, one line per mask (or "no mask") with its label
    and score when it has them, then the image's size and image tokens."""
    from utils.grounding import seg_labels

    lines = [f"answer: {answer.text}"]
    if not answer.masks:
        lines.append(NO_MASK_MESSAGE)
    labels, scores = seg_labels(answer.text), answer.scores
    for index, box in enumerate(answer.boxes):
        label = labels[index] if index < len(labels) else None
        line = f"mask {index}" + (f" ({label})" if label else "") + f": {describe_box(box)}"
        if index < len(scores) and scores[index] is not None:
            line += f", score {scores[index]:.3f}"
        if saved:
            line += f" -> {saved[index][0]}, {saved[index][1]}"
        lines.append(line)
    lines.append(describe_image(answer))
    return "\n".join(lines)


def render_overlay(answer: Answer) -> np.ndarray:
    """The image with every mask and its box drawn (the image itself when there is no mask)."""
    if not answer.masks:
        return answer.image.array.copy()
    labels = [f"{index}" for index in range(len(answer.masks))]
    return overlay_masks(answer.image.array, answer.seen_masks, labels=labels)


def save_visuals(answer: Answer, out_dir: str | os.PathLike, prefix: str) -> list[tuple[Path, Path]]:
    """Per ``[SEG]``: ``{prefix}_mask_{i}.png`` (0/255, the original image's size) and
    ``{prefix}_overlay_{i}.png`` (on the image as the model saw it). Files of an earlier answer
    under the same prefix are removed first, so that none is taken for part of this one.

    Returns:
        the (mask, overlay) paths, in the order of the ``[SEG]`` tokens.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Exactly this prefix's files: "road" must not take "road_mask_v2.jpg"'s "road_mask_v2_mask_0.png".
    ours = re.compile(re.escape(prefix) + r"_(mask|overlay)_\d+\.png")
    for stale in out_dir.glob(f"{glob.escape(prefix)}_*.png"):
        if ours.fullmatch(stale.name):
            stale.unlink()
    saved = []
    for index, (full, mask) in enumerate(zip(answer.masks, answer.seen_masks)):
        mask_path = out_dir / f"{prefix}_mask_{index}.png"
        overlay_path = out_dir / f"{prefix}_overlay_{index}.png"
        Image.fromarray(full.astype(np.uint8) * 255).save(mask_path)
        Image.fromarray(overlay_masks(answer.image.array, [mask], colors=[_colour(index)])).save(overlay_path)
        saved.append((mask_path, overlay_path))
    return saved


def _colour(index: int) -> tuple[int, int, int]:
    from utils.masks import DEFAULT_PALETTE

    return DEFAULT_PALETTE[index % len(DEFAULT_PALETTE)]


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


WARM_UP_TOKENS = 2
"""Tokens a warm-up request generates (each runs the decoding step) before it ends its turn."""


class EndTurnAfter:
    """A logits processor ending the answer after ``tokens`` freely chosen tokens, or at the next
    token once ``stop`` is set (one generation).

    Args:
        tokens: answer tokens chosen as the model likes (None: as many as the request allows).
        end_id: the token then forced (end of turn).
        stop: set by another thread to end the answer early.
    """

    def __init__(self, tokens: int | None, end_id: int, stop: threading.Event | None = None) -> None:
        self.tokens = tokens
        self.end_id = end_id
        self.stop = stop
        self.prompt_length: int | None = None

    def __call__(self, input_ids, scores):
        """``input_ids`` [B, t] (prompt and answer so far), ``scores`` [B, V] -> scores."""
        if self.prompt_length is None:  # the first call sees the prompt alone
            self.prompt_length = input_ids.shape[1]
        free = self.tokens is None or input_ids.shape[1] - self.prompt_length < self.tokens
        if free and not (self.stop is not None and self.stop.is_set()):
            return scores
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[:, self.end_id] = 0
        return forced


class InferenceSession:
    """A loaded model answering requests (one at a time, or several as one batch with
    :meth:`ask_batch`; thread-safe), reusing image features.

    Whatever thread asks, the model runs on one worker thread of the session: a compiled
    decoding step replays CUDA graphs, which torch keeps per thread (pytorch/pytorch#123177:
    compiled CUDA graphs called from several threads fail), and the Gradio app answers each
    request on a thread of its own pool.

    A next question about the same image reuses its SAM embedding, and its image prefix's keys
    and values in the language model (:class:`model.decoding.PrefixCache`): only the new
    question's tokens run.

    Args:
        model: a :class:`~model.segmenter.ReasonSegmenter` in eval mode.
        max_new_tokens: answer length limit.
        max_image_side, max_image_pixels: see :func:`load_image`.
        cache_size: images whose encoded features are kept (0: no reuse).
        decoding: see :data:`model.decoding.DECODING_MODES`.
    """

    def __init__(
        self,
        model,
        max_new_tokens: int = 64,
        max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cache_size: int = 8,
        decoding: str = "auto",
    ) -> None:
        from model.decoding import PrefixCache, prefixes_reusable, resolve_decoding
        from model.image_cache import FeatureCache

        self.model = model
        self.max_new_tokens = max_new_tokens
        self.max_image_side = max_image_side
        self.max_image_pixels = max_image_pixels
        self.decoding = resolve_decoding(decoding, model.device)
        # With the image prefix reused, a follow-up never runs the vision tower: no store for it.
        self.cache = FeatureCache(cache_size, vision=not prefixes_reusable(model.vlm)).attach(model)
        self.prefixes = PrefixCache(cache_size)
        # Files decoded before, by path, modification time and size: a follow-up typed with the
        # same path skips the decode (a 4000x3000 JPEG takes a good part of a second).
        self._files: LRU[tuple, LoadedImage] = LRU(cache_size)
        self._files_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def load(self, image: Any) -> LoadedImage:
        if isinstance(image, LoadedImage):
            return image
        sizes = self.model_input_sizes()
        if not isinstance(image, (str, os.PathLike)):
            return load_image(image, self.max_image_side, self.max_image_pixels, sizes)
        try:
            path = Path(image).expanduser().resolve()
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size, self.max_image_side, self.max_image_pixels, sizes)
        except (OSError, RuntimeError, ValueError):  # load_image says what is wrong with it
            return load_image(image, self.max_image_side, self.max_image_pixels, sizes)
        with self._files_lock:
            loaded = self._files.get(key)
        if loaded is None:
            loaded = load_image(image, self.max_image_side, self.max_image_pixels, sizes)
            loaded.array.setflags(write=False)  # shared by the answers about this file
            with self._files_lock:
                self._files.put(key, loaded)
        return loaded

    def model_input_sizes(self) -> ModelInputSizes:
        """How the session's models resize images (their limits now): a JPEG they would take
        smaller is decoded at a reduced scale (:func:`load_image`)."""
        return ModelInputSizes.for_processor(self.model.processor, self.model.sam_transform.image_size)

    def ask(self, image: Any, prompt: Any, **generate_kwargs) -> Answer:
        """Answer ``prompt`` about ``image`` (a path, bytes, PIL image, array or LoadedImage).

        ``generate_kwargs`` go to the model's ``generate`` (e.g. a logits processor) and override
        the session's ``max_new_tokens``, ``decoding`` and ``prefix_cache``.
        Raises:
            InputError: an empty prompt or an unusable image.
            KeyboardInterrupt: Ctrl-C while the answer was written; the worker ends it at its next token.
        """
        prompt = check_prompt(prompt)
        loaded = self.load(image)
        [answer] = self._ask_on_worker([loaded], [prompt], generate_kwargs)
        if answer.features_reused:
            logger.info("reused the cached image features of %s (no re-encoding)", loaded.source)
        return answer

    def ask_batch(self, images: Sequence[Any], prompts: Sequence[Any], **generate_kwargs) -> list[Answer]:
        """Answer several requests as one batch (one generation, prompts left-padded): on a GPU,
        several times the requests per second of :meth:`ask` one at a time. Each answer is what
        :meth:`ask` gives up to float rounding (padding changes the shapes of the matrix products).

        Raises:
            InputError: an empty prompt or an unusable image (the first one met; a caller that
                must tell which checks each with :func:`check_prompt` and :meth:`load` first).
            KeyboardInterrupt: as for :meth:`ask`, the whole batch.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        prompts = [check_prompt(prompt) for prompt in prompts]
        loaded = [self.load(image) for image in images]
        return self._ask_on_worker(loaded, prompts, generate_kwargs) if loaded else []

    def _ask_on_worker(self, loaded: list[LoadedImage], prompts: list[str], generate_kwargs: dict) -> list[Answer]:
        stop = threading.Event()
        try:
            results, reused = self._worker.submit(self._answer, loaded, prompts, generate_kwargs, stop).result()
        except KeyboardInterrupt:
            # Ctrl-C reaches this thread, not the worker, which would write the answer to its end
            # (minutes on a CPU) and hold the process at exit: end it at its next token.
            stop.set()
            raise
        return [
            Answer(prompt=prompt, image=image, result=result, features_reused=reused)
            for image, prompt, result in zip(loaded, prompts, results)
        ]

    def warm_up(self, image: Any, prompt: str = "What is in this image?") -> float:
        """Answer one short request about ``image`` and drop the answer; returns its seconds.

        With ``compiled`` decoding this compiles the decoding step for a one-request batch of that
        image's prompt length now (a long-running app calls it at start) instead of on a user's
        first request; with ``--compile_sam``, SAM's image encoder for one image likewise. The
        request has the session's ``max_new_tokens`` (the step is compiled per cache length, which
        counts them) and ends after :data:`WARM_UP_TOKENS` tokens.
        """
        from transformers import LogitsProcessorList

        loaded = self.load(image)
        end_early = LogitsProcessorList([EndTurnAfter(WARM_UP_TOKENS, self.model.processor.tokenizer.eos_token_id)])
        start = time.perf_counter()
        self._worker.submit(
            lambda: self.model.predict(
                [loaded.array], [prompt], max_new_tokens=self.max_new_tokens, decoding=self.decoding,
                logits_processor=end_early, prefix_cache=self.prefixes,
            )
        ).result()
        return time.perf_counter() - start

    def _answer(self, loaded: list[LoadedImage], prompts: list[str], generate_kwargs: dict, stop: threading.Event) -> tuple:
        """(the model's results, whether the image's features were reused: one request only); on
        the worker thread. Setting ``stop`` ends the answers at their next token."""
        from transformers import LogitsProcessorList

        before = dict(self.cache.stats, prefix_hits=self.prefixes.stats["hits"])
        options = {"max_new_tokens": self.max_new_tokens, "decoding": self.decoding, "prefix_cache": self.prefixes}
        given = generate_kwargs.get("logits_processor") or []
        # Last, so that the end of turn it forces is what is chosen whatever the others did.
        processors = LogitsProcessorList([*(given if isinstance(given, list) else [given]),
                                          EndTurnAfter(None, self.model.processor.tokenizer.eos_token_id, stop)])
        results = self.model.predict(
            [image.array for image in loaded], prompts, mask_sizes=[image.resized_from for image in loaded],
            **{**options, **generate_kwargs, "logits_processor": processors},
        )
        stats = self.cache.stats
        vision_reused = stats["vision_hits"] > before["vision_hits"] or self.prefixes.stats["hits"] > before["prefix_hits"]
        return results, len(loaded) == 1 and stats["sam_hits"] > before["sam_hits"] and vision_reused

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self.cache.detach()
        self.cache.clear()
        self.prefixes.clear()
