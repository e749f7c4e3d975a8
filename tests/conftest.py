"""Shared fixtures: tiny models saved as real Hugging Face directories, real photographs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

# One thread: the tiny models are too small to gain from more, and tests that start
# subprocesses would otherwise compete for the two cores.
torch.set_num_threads(1)


def load_photo(name: str) -> np.ndarray:
    """A real photograph from tests/data as HxWx3 uint8 RGB."""
    return np.array(Image.open(DATA / name).convert("RGB"))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """Per family, a tiny Qwen-VL checkpoint directory (built once per session)."""
    from model.tiny import save_tiny_vlm

    cache = {}

    def get(family: str = "qwen2_5_vl") -> Path:
        if family not in cache:
            cache[family] = save_tiny_vlm(tmp_path_factory.mktemp(f"vlm_{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_segmenter_dir(tmp_path_factory):
    """Per family, a complete tiny segmenter directory (built once per session)."""
    from model.tiny import make_tiny_segmenter

    cache = {}

    def get(family: str = "qwen2_5_vl") -> Path:
        if family not in cache:
            cache[family] = make_tiny_segmenter(tmp_path_factory.mktemp(f"segmenter_{family}"), family)
        return cache[family]

    return get


@pytest.fixture
def dog() -> np.ndarray:
    return load_photo("dog.jpg")
