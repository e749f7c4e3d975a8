"""Drawing masks over images for inspection (green target, red ignore)."""

from __future__ import annotations

import numpy as np

from utils.data.sample import IGNORE_LABEL

TARGET_COLOUR = np.array([0, 255, 0], dtype=np.float64)
IGNORE_COLOUR = np.array([255, 0, 0], dtype=np.float64)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``image`` with target pixels (1) tinted green and ignored pixels (255) tinted red."""
    result = image.astype(np.float64)
    for value, colour in ((1, TARGET_COLOUR), (IGNORE_LABEL, IGNORE_COLOUR)):
        region = mask == value
        result[region] = alpha * colour + (1 - alpha) * result[region]
    return np.clip(np.round(result), 0, 255).astype(np.uint8)
