"""Reading images, label maps and annotation files, with errors that name the file."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from utils.data.sample import CorruptSampleError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

EXIF_ORIENTATION_TAG = 0x0112
SIDE_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that turn the image by 90 or 270 degrees (``ImageOps.exif_transpose``)."""

JSON_FALLBACK_ENCODINGS = ("utf-8", "utf-8-sig", "cp1252", "latin-1")
"""Encodings tried in order when reading annotation JSON (some ReasonSeg files are cp1252)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB. 16- and 32-bit grayscale (``I;16``, ``I``) is scaled to 8 bits: PIL's
    own conversion clips it at 255, which turns a 16-bit photograph white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.uint32)
        if values.max(initial=0) > 255:  # 16-bit values (an 8-bit range in mode I is left as it is)
            values = np.minimum(values, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode L
    return image.convert("RGB")


def load_image_rgb(
    path: PathLike,
    exif_orientation: bool = True,
    choose_orientation: Callable[[tuple[int, int], tuple[int, int]], bool] | None = None,
) -> np.ndarray:
    """Read an image as an ``H x W x 3`` uint8 RGB array.

    ``exif_orientation``: turn it upright as its EXIF orientation says (what a viewer shows, and
    what labelme annotates: ReasonSeg). False: the pixels as stored, which COCO-style polygons,
    RLE masks and label maps index (refCOCO and the other COCO-based sources, semantic label
    maps, LLaVA's VQA, all of which were made on the stored pixels).

    ``choose_orientation``, when given, decides instead of ``exif_orientation``: it is called
    before the pixels are decoded with the ``(height, width)`` of the stored pixels and of the
    upright image, and returns whether to turn the image upright. A :class:`CorruptSampleError`
    it raises passes through.

    Raises:
        CorruptSampleError: the file is missing or cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as image:
            if choose_orientation is not None:
                stored = (image.height, image.width)
                turned = image.getexif().get(EXIF_ORIENTATION_TAG) in SIDE_SWAPPING_ORIENTATIONS
                exif_orientation = choose_orientation(stored, stored[::-1] if turned else stored)
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image), dtype=np.uint8).copy()
    except CorruptSampleError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError ...)
        raise CorruptSampleError(f"cannot read image {os.fspath(path)}: {error}") from error


def load_label_map(path: PathLike) -> np.ndarray:
    """Read a label-map PNG as stored (palette indices for ``P`` images, no EXIF rotation).

    Returns ``H x W`` for single-channel files and ``H x W x 3`` for RGB ones.

    Raises:
        CorruptSampleError: the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as label:
            if label.mode in ("RGB", "RGBA"):
                return np.asarray(label.convert("RGB")).copy()
            return np.asarray(label).copy()
    except Exception as error:
        raise CorruptSampleError(f"cannot read label map {os.fspath(path)}: {error}") from error


def read_json_lenient(path: PathLike) -> Any:
    """Parse a JSON file, trying UTF-8 first and then legacy encodings (cp1252, latin-1).

    Raises:
        CorruptSampleError: the file is missing or is not JSON in any of the encodings.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise CorruptSampleError(f"cannot read annotation {os.fspath(path)}: {error}") from error
    last_error: Exception | None = None
    for encoding in JSON_FALLBACK_ENCODINGS:
        try:
            data = json.loads(raw.decode(encoding))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            last_error = error
            continue
        if encoding not in ("utf-8", "utf-8-sig"):
            logger.debug("%s decoded as %s", os.fspath(path), encoding)
        return data
    raise CorruptSampleError(f"cannot parse annotation {os.fspath(path)}: {last_error}")


def read_json(path: PathLike) -> Any:
    """Parse a UTF-8 JSON index file (large files: no encoding fallback).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {os.fspath(path)}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_pickle(path: PathLike) -> Any:
    """Load a pickle written by Python 3 or by Python 2 (the refer ``refs(*).p`` files).

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {os.fspath(path)}")
    with open(path, "rb") as handle:
        try:
            return pickle.load(handle)
        except UnicodeDecodeError:
            handle.seek(0)
            return pickle.load(handle, encoding="latin1")
