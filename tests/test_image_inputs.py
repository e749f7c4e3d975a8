"""A follow-up question about the same image: the preprocessed image is reused (model.batch.
prepare_image through FeatureCache), and the caches key on the image's key instead of hashing the
model inputs again; the answers stay exactly those of a fresh request, on all three Qwen-VL
generations."""

import os
import threading

import numpy as np
import pytest
import torch

from conftest import load_photo
from test_decoding import forced, model  # noqa: F401 (model: the LoRA segmenter of each family)
from model import decoding, image_cache
from model.batch import image_key
from model.decoding import PrefixCache
from model.image_cache import FeatureCache
from model.image_tokens import pixel_limits, set_pixel_limits
from model.segmenter import ReasonSegmenter


@pytest.fixture(scope="module")
def dog():
    return load_photo("dog.jpg")


def ask(model, image, question, prefixes=None):
    batch = model.collate([model.prepare(image, [(question, None)])], "left")
    script = forced(model, batch, "It is [SEG].")
    return model.generate(batch, 8, decoding="eager", prefix_cache=prefixes, logits_processor=script)[0]


def test_a_follow_up_reuses_the_prepared_image_and_keys_the_caches_on_it(model, dog, monkeypatch):
    fresh = ask(model, dog, "And its tail?")  # no cache at all: the reference

    processed, hashed = [], []
    image_processor = type(model.processor.image_processor)
    real_call, real_key = image_processor.__call__, image_cache.tensor_key
    monkeypatch.setattr(image_processor, "__call__", lambda self, *a, **k: (processed.append(1), real_call(self, *a, **k))[1])

    def recording_key(*tensors):
        hashed.append(sum(t.numel() for t in tensors if t is not None))
        return real_key(*tensors)

    monkeypatch.setattr(image_cache, "tensor_key", recording_key)
    monkeypatch.setattr(decoding, "tensor_key", recording_key)
    cache, prefixes = FeatureCache(max_items=4), PrefixCache(max_items=4)
    with cache.attached(model):
        first = ask(model, dog, "Where is the dog?", prefixes)
        hashed.clear()  # (a first request hashes the vision tower's input: its store is keyed on it)
        follow_up = ask(model, dog, "And its tail?", prefixes)
        batch = model.collate([model.prepare(dog, [("Again?", None)])], "left")
    assert len(processed) == 1, "the image went through Qwen's image processor again"
    assert cache.stats["image_hits"] == 2 and cache.stats["image_misses"] == 1
    assert cache.stats["sam_hits"] == 1 and cache.stats["sam_misses"] == 1
    assert prefixes.stats == {"hits": 1, "misses": 1}
    assert batch["image_keys"] == [image_key(model.processor, model.sam_transform, dog)]
    # The follow-up hashed prompt tokens only: the SAM input and Qwen's pixels are keyed by the image's key.
    assert hashed and max(hashed) < batch["input_ids"].shape[1]
    assert follow_up.token_ids == fresh.token_ids and follow_up.text == fresh.text
    torch.testing.assert_close(follow_up.seg_states, fresh.seg_states, atol=1e-5, rtol=0)
    assert len(first.masks) == len(follow_up.masks) == len(fresh.masks) == 1
    assert np.array_equal(follow_up.masks[0], fresh.masks[0])


def test_a_changed_pixel_or_setting_is_another_image(model, dog):
    cache = FeatureCache(max_items=4)
    other = dog.copy()
    other[0, 0] ^= 1
    limits = pixel_limits(model.processor)
    with cache.attached(model):
        first = model.prepare(dog, [("Dog?", None)])
        model.prepare(other, [("Dog?", None)])
        assert cache.stats["image_misses"] == 2
        try:
            set_pixel_limits(model.processor, limits.min_pixels, limits.max_pixels // 2)
            smaller = model.prepare(dog, [("Dog?", None)])
        finally:
            set_pixel_limits(model.processor, limits.min_pixels, limits.max_pixels)
    assert cache.stats["image_misses"] == 3 and cache.stats["image_hits"] == 0
    assert smaller["image_key"] != first["image_key"]
    assert smaller["pixel_values"].shape[0] < first["pixel_values"].shape[0]
    # Outside the cache a sample carries no key, and the caches hash the inputs as before.
    assert model.prepare(dog, [("Dog?", None)])["image_key"] is None


def test_image_key_is_cheap_and_exact():
    from tools.bench.common import default_qwen25_processor
    from model.sam import SamTransform

    processor = default_qwen25_processor()
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    key = image_key(processor, SamTransform(1024), image)
    assert key == image_key(processor, SamTransform(1024), image.copy())
    assert key != image_key(processor, SamTransform(512), image)
    assert key != image_key(processor, SamTransform(1024), image[:, :, ::-1])
    assert key != image_key(processor, SamTransform(1024), image.reshape(640, 480, 3))


def test_both_models_see_the_same_rgb_image_whatever_form_it_comes_in(model, dog):
    """A grayscale array, a palette PIL image: made RGB once, and keyed by their colours (two
    palette images with the same indices and other colours are two images)."""
    from PIL import Image

    from model.sam import as_rgb_uint8

    gray = dog.mean(axis=2).astype(np.uint8)
    sample = model.prepare(gray, [("Dog?", None)])
    reference = model.prepare(np.repeat(gray[:, :, None], 3, axis=2), [("Dog?", None)])
    for key in ("pixel_values", "image_grid_thw", "sam_pixel_values"):
        assert torch.equal(sample[key], reference[key]), key
    indices = Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 4).astype(np.uint8), mode="P")
    red, blue = indices.copy(), indices.copy()
    red.putpalette([255, 0, 0] * 4 + [0] * 756)
    blue.putpalette([0, 0, 255] * 4 + [0] * 756)
    cache = FeatureCache(max_items=4)
    with cache.attached(model):
        red_sample = model.prepare(red, [("Red?", None)])
        blue_sample = model.prepare(blue, [("Blue?", None)])
    assert cache.stats["image_misses"] == 2 and red_sample["image_key"] != blue_sample["image_key"]
    assert torch.equal(blue_sample["pixel_values"], model.prepare(as_rgb_uint8(blue), [("Blue?", None)])["pixel_values"])


def test_a_sam_embedding_is_not_served_after_the_model_changes_dtype(tiny_vlm_dir, dog):
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    cache = FeatureCache(max_items=4)
    with cache.attached(model):
        ask(model, dog, "Where is the dog?")
        model.to(torch.bfloat16)
        ask(model, dog, "And its tail?")
    assert cache.stats["image_hits"] == 1, "the preprocessed image does not depend on the model's dtype"
    assert cache.stats["sam_hits"] == 0 and cache.stats["sam_misses"] == 2


def test_a_batch_of_two_cached_images_is_answered_as_without_the_cache(model, dog):
    """Two requests in one left-padded batch, asked again: both images' inputs and SAM
    embeddings come from the cache (keyed per image), and the answers are those of no cache."""
    truck = load_photo("truck.jpg")
    questions = ["Where is the dog?", "Where is the truck?"]

    def ask_both():
        batch = model.collate([model.prepare(image, [(q, None)]) for image, q in zip((dog, truck), questions)], "left")
        return model.generate(batch, 8, decoding="eager", logits_processor=forced(model, batch, "It is [SEG]."))

    fresh = ask_both()
    cache = FeatureCache(max_items=4)
    with cache.attached(model):
        ask_both()
        again = ask_both()
    assert cache.stats["image_hits"] == 2 and cache.stats["sam_hits"] == 2 and cache.stats["sam_misses"] == 2
    for mine, theirs in zip(again, fresh):
        assert mine.token_ids == theirs.token_ids
        torch.testing.assert_close(mine.seg_states, theirs.seg_states, atol=1e-5, rtol=0)
        assert all(np.array_equal(a, b) for a, b in zip(mine.masks, theirs.masks))


def test_predict_prepares_its_images_in_parallel_into_the_batch_one_at_a_time_makes(model, monkeypatch):
    """predict preprocesses on several threads: the batch it decodes is exactly the one made by
    preparing the requests one after another, in request order."""
    images = [load_photo("dog.jpg"), load_photo("truck.jpg"), load_photo("dog.jpg")[::2, ::3].mean(-1).astype(np.uint8)]
    prompts = ["Where is the dog?", "Find the front wheel of the truck.", "And here?"]
    threads, decoded = set(), []
    prepare = model.prepare

    def recording_prepare(image, turns, *args, **kwargs):
        threads.add(threading.get_ident())
        return prepare(image, turns, *args, **kwargs)

    def recording_generate(batch, *args, **kwargs):
        decoded.append(batch)
        return []

    monkeypatch.setattr(model, "prepare", recording_prepare)
    monkeypatch.setattr(model, "generate", recording_generate)
    model.predict(images, prompts)
    serial = model.collate([prepare(image, [(prompt, None)]) for image, prompt in zip(images, prompts)], "left")
    [parallel] = decoded
    assert len(threads) == min(3, os.cpu_count() or 1)
    assert parallel.keys() == serial.keys()
    for key, value in serial.items():
        assert identical(parallel[key], value), key


def identical(a, b) -> bool:
    """Equal to the element, through lists, tuples and dicts of tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b
