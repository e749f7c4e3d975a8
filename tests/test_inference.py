"""inference.py and its library (utils/inference.py, utils/inference_cli.py, model/image_cache.py, model/loading.py).

Library tests force the answer with a logits processor (a random tiny model rarely says [SEG]);
the entry point runs as a subprocess, as people run it, with whatever the random model says.
"""

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import DATA, REPO, load_photo
from model.decoding import CACHE_LENGTH_STEP
from model.image_cache import FeatureCache, find_vision_tower
from model.loading import ModelLoadError, load_segmenter, quantization_config
from model.segmenter import ReasonSegmenter
from utils.inference import (
    NO_MASK_MESSAGE,
    Answer,
    InferenceSession,
    InputError,
    LoadedImage,
    ModelInputSizes,
    describe,
    describe_box,
    load_image,
    render_overlay,
    save_visuals,
)
from utils.inference_cli import interactive_loop, one_shot, run_batch
from utils.masks import decode_rle, mask_to_box

DOG = DATA / "dog.jpg"
TWO_MASKS = "It is [SEG] and [SEG]."


class ScriptedAnswer(LogitsProcessor):
    """Greedy decoding writes ``token_ids`` from the first generated token on (one generation)."""

    def __init__(self, token_ids):
        self.token_ids = token_ids
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        scores = torch.full_like(scores, -1e9)
        scores[:, self.token_ids[min(step, len(self.token_ids) - 1)]] = 0
        return scores


def scripted(model, answer: str) -> LogitsProcessorList:
    """A fresh logits processor making ``model`` answer ``answer`` (use one per request)."""
    tokenizer = model.processor.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return LogitsProcessorList([ScriptedAnswer(ids)])


def run_entry(args, stdin=None, timeout=180, wrapper=None):
    """Run a repository entry point as a subprocess; ``wrapper`` is Python run before it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if wrapper:
        code = f"{wrapper}\nimport runpy, sys\nsys.argv = {list(map(str, args))!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, *map(str, args)]
    text = not isinstance(stdin, bytes)  # bytes: stdin as given, stdout and stderr undecoded
    return subprocess.run(command, cwd=REPO, env=env, input=stdin, capture_output=True, text=text, timeout=timeout)


@pytest.fixture(scope="module")
def model(tiny_segmenter_dir):
    return ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()


@pytest.fixture
def session(model):
    session = InferenceSession(model, max_new_tokens=12)
    yield session
    session.close()


def always_answer(monkeypatch, session, answer):
    """Make every ``session.ask`` (as run_batch and the loop call it) give ``answer``."""
    ask = session.ask
    monkeypatch.setattr(session, "ask", lambda image, prompt: ask(image, prompt, logits_processor=scripted(session.model, answer)))


# ------------------------------------------------------------------------------- images


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    image.save(tmp_path / "sideways.jpg", exif=exif)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.array.shape == (60, 40, 3) and loaded.array.dtype == np.uint8
    assert loaded.name == "sideways" and loaded.resized_from is None


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory):
    """A 4000x3000 JPEG, as phones take them, and the same photo stored sideways (EXIF 6)."""
    folder = tmp_path_factory.mktemp("phone")
    photo = Image.open(DOG).convert("RGB").resize((4000, 3000), Image.BILINEAR)
    photo.save(folder / "photo.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / "sideways.jpg", quality=90, exif=exif)
    photo.save(folder / "photo.png", compress_level=1)
    photo.save(folder / "photo_mpo.jpg", format="MPO", quality=90)  # how many phones write their JPEGs
    photo.resize((4489, 2494)).save(folder / "odd.jpg", quality=90)
    return folder


QWEN25_DEFAULT_TAKE = ModelInputSizes(56 * 56, 1280 * 28 * 28, 28, 1024)  # Qwen2.5-VL at 1,280 tokens, SAM at 1024


def test_a_large_jpeg_is_decoded_as_small_as_gives_the_models_the_same_inputs(phone_photo):
    """4000x3000 at 1,280 tokens: the decoder's 1/2 scale keeps 3 MP (>= 1 MP for Qwen, a 2000-pixel
    side >= 1024 for SAM); at a 4 MP budget it may not halve, and it never goes below a 1024-pixel
    side (1/4 would be 1000). PNG has no reduced decode."""
    loaded = load_image(phone_photo / "photo.jpg", model_inputs=QWEN25_DEFAULT_TAKE)
    assert loaded.array.shape == (1500, 2000, 3) and loaded.resized_from == (3000, 4000)
    assert load_image(phone_photo / "photo_mpo.jpg", model_inputs=QWEN25_DEFAULT_TAKE).array.shape == (1500, 2000, 3)
    # At a 4 MP budget Qwen would take more than 2000x1500 holds; SAM at 3000 likewise (it would
    # enlarge the copy); at 512 the decoder could go to 1000x750, but stops at a 1024-pixel side.
    for sizes, shape in (((3136, 4_000_000, 28, 1024), (3000, 4000, 3)), ((3136, 100_000, 28, 3000), (3000, 4000, 3)),
                         ((3136, 100_000, 28, 512), (1500, 2000, 3))):
        assert load_image(phone_photo / "photo.jpg", model_inputs=ModelInputSizes(*sizes)).array.shape == shape
    # Qwen-VL refuses over 200:1: not a reason to fail while choosing the decode, but the image's message.
    Image.new("RGB", (20100, 100), (0, 90, 200)).save(phone_photo / "strip.jpg", quality=80)
    with pytest.raises(InputError, match="up to 200:1"):
        load_image(phone_photo / "strip.jpg", max_side=0, model_inputs=QWEN25_DEFAULT_TAKE)
    # 4489x2494: halved, SAM's input would be 569x1024 instead of 568x1024 (rounding): decoded whole.
    assert load_image(phone_photo / "odd.jpg", max_side=0, model_inputs=QWEN25_DEFAULT_TAKE).array.shape == (2494, 4489, 3)
    whole = load_image(phone_photo / "photo.jpg")
    assert whole.array.shape == (3000, 4000, 3) and whole.resized_from is None
    png = load_image(phone_photo / "photo.png", model_inputs=QWEN25_DEFAULT_TAKE)
    assert png.array.shape == (3000, 4000, 3) and png.resized_from is None
    sideways = load_image(phone_photo / "sideways.jpg", model_inputs=QWEN25_DEFAULT_TAKE)
    assert sideways.array.shape == (2000, 1500, 3) and sideways.resized_from == (4000, 3000)
    # Over --max_image_side, but decoded smaller than it already: kept so, never upsized to it.
    Image.open(phone_photo / "photo.jpg").resize((4400, 3300)).save(phone_photo / "wide.jpg", quality=90)
    wide = load_image(phone_photo / "wide.jpg", max_side=4096, model_inputs=QWEN25_DEFAULT_TAKE)
    assert wide.array.shape == (1650, 2200, 3) and wide.resized_from == (3300, 4400)
    assert load_image(phone_photo / "wide.jpg", max_side=4096).array.shape == (3072, 4096, 3)
    # The decoder's reduction is a good downscale: the same picture, pixel for pixel nearly.
    halved = np.asarray(Image.fromarray(whole.array).resize((2000, 1500), Image.BOX), dtype=np.float32)
    assert np.abs(halved - loaded.array.astype(np.float32)).mean() < 2.0


def test_a_session_answers_a_phone_photo_in_its_own_pixels(model, phone_photo, monkeypatch):
    """The session decodes the photo at what the model takes; the answer is given in the photo's
    4000x3000 pixels, with as many image tokens as the whole photo would have made."""
    session = InferenceSession(model, max_new_tokens=8)
    try:
        always_answer(monkeypatch, session, TWO_MASKS)
        answer = session.ask(phone_photo / "photo.jpg", "Where is the dog?")
        assert answer.image.array.shape == (1500, 2000, 3) and answer.image.resized_from == (3000, 4000)
        assert session.model_input_sizes().same_from((3000, 4000), (1500, 2000))
        record = answer.record()
        assert (record["width"], record["height"]) == (4000, 3000)
        assert record["downscaled_to"] == {"width": answer.image.array.shape[1], "height": answer.image.array.shape[0]}
        assert [mask.shape for mask in answer.masks] == [(3000, 4000)] * 2  # SAM's logits upsampled to the photo
        assert [mask.shape for mask in answer.seen_masks] == [answer.image.array.shape[:2]] * 2  # for overlays
        assert answer.boxes == [mask_to_box(mask) for mask in answer.masks]
        whole = session.ask(load_image(phone_photo / "photo.jpg"), "Where is the dog?")
        assert answer.image_tokens == whole.image_tokens
        for reduced, full in zip(answer.masks, whole.masks):  # made the same way, from nearly the same pixels
            assert (reduced == full).mean() >= 0.98
    finally:
        session.close()


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_huge_image_is_downscaled_with_a_message(tmp_path, caplog, suffix):
    Image.new("RGB", (5000, 300), (0, 90, 200)).save(tmp_path / f"wide.{suffix}")
    with caplog.at_level("INFO"):
        loaded = load_image(tmp_path / f"wide.{suffix}", max_side=1000)
    assert loaded.array.shape == (60, 1000, 3)
    assert loaded.resized_from == (300, 5000)
    assert "resized to 1000x60" in caplog.text
    assert load_image(tmp_path / f"wide.{suffix}").array.shape == (246, 4096, 3)  # the default 4096
    # Exactly twice the side: the JPEG decoder's 1/2 scale is the whole downscale, and says so too.
    Image.new("RGB", (2000, 100), (0, 90, 200)).save(tmp_path / f"twice.{suffix}")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert load_image(tmp_path / f"twice.{suffix}", max_side=1000).array.shape == (50, 1000, 3)
    assert "resized to 1000x50" in caplog.text


def test_too_many_pixels_is_refused(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"big\.png is 300x200 .*over the limit"):
        load_image(tmp_path / "big.png", max_pixels=50_000)


def test_our_pixel_limit_decides_not_pils(tmp_path, monkeypatch):
    """PIL refuses images over twice its MAX_IMAGE_PIXELS (~179 MP) at open: --max_image_pixels
    300000000 must let a 200 MP image through (here scaled down: PIL's limit set to 1,000)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100), (0, 90, 200)).save(tmp_path / "large.png")
    assert load_image(tmp_path / "large.png", max_pixels=50_000).array.shape == (100, 100, 3)
    with pytest.raises(InputError, match=r"large\.png is 100x100 .*raise --max_image_pixels"):
        load_image(tmp_path / "large.png", max_pixels=5_000)


def test_unreadable_inputs_give_messages_naming_them(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "cut.jpg").write_bytes(DOG.read_bytes()[:20000])
    for path, message in [
        (tmp_path / "missing.jpg", r"missing\.jpg does not exist"),
        (tmp_path / "notes.jpg", r"notes\.jpg is not an image"),
        (tmp_path / "cut.jpg", r"cut\.jpg could not be decoded"),
        (tmp_path, "is not a file"),
    ]:
        with pytest.raises(InputError, match=message):
            load_image(path)


def test_empty_prompt_is_refused(session):
    for prompt in ("", "   \n", None):
        with pytest.raises(InputError, match="request is (empty|missing)"):
            session.ask(DOG, prompt)


# ------------------------------------------------------------------------------- answers


def test_each_seg_gets_a_mask_png_an_overlay_and_a_box(session, tmp_path):
    answer = session.ask(DOG, "Where is the dog?", logits_processor=scripted(session.model, TWO_MASKS))
    assert answer.text == TWO_MASKS and len(answer.masks) == 2
    saved = save_visuals(answer, tmp_path, "dog")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dog_mask_0.png", "dog_mask_1.png", "dog_overlay_0.png", "dog_overlay_1.png",
    ]
    text = describe(answer, saved)
    photo = load_photo("dog.jpg")
    for index, (mask_path, overlay_path) in enumerate(saved):
        mask = np.array(Image.open(mask_path))
        assert mask.shape == photo.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 0, answer.masks[index])
        overlay = np.array(Image.open(overlay_path))
        assert overlay.shape == photo.shape
        assert answer.boxes[index] == mask_to_box(mask > 0)
        assert f"mask {index}: " in text and str(mask_path) in text
        outside = np.ones(mask.shape, bool)  # away from the mask and its box outline
        if answer.masks[index].any():  # pixels under the mask are tinted
            assert not np.array_equal(overlay[answer.masks[index]], photo[answer.masks[index]])
            x0, y0, x1, y1 = answer.boxes[index]
            outside[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = False
        assert np.array_equal(overlay[outside], photo[outside])
    record = answer.record()
    assert (record["width"], record["height"], record["text"]) == (800, 534, TWO_MASKS)
    assert record["prompt"] == "Where is the dog?" and record["downscaled_to"] is None
    assert len(record["objects"]) == 2
    for obj, mask, score in zip(record["objects"], answer.masks, answer.scores):
        assert np.array_equal(decode_rle(obj["mask"]), mask) and obj["area"] == mask.sum()
        assert obj["bbox_2d"] == (list(mask_to_box(mask)) if mask.any() else None)
        assert obj["label"] is None  # "It is [SEG] and [SEG]." names nothing
        assert (obj["score"] is None) == (not mask.any()) == (score is None)
    json.dumps(record)


def test_scores_come_from_the_model_not_the_mask(model):
    """The score is the mean mask probability: surer logits for the same mask give a higher score."""
    session = InferenceSession(model, max_new_tokens=8, cache_size=0)
    before = session.ask(DOG, "Where is the dog?", logits_processor=scripted(model, "[SEG]"))
    last = model.sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    saved = (last.weight.detach().clone(), last.bias.detach().clone())
    try:
        with torch.no_grad():  # logits x 3: the same mask (same signs), other probabilities
            last.weight.mul_(3.0)
            last.bias.mul_(3.0)
        after = session.ask(DOG, "Where is the dog?", logits_processor=scripted(model, "[SEG]"))
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])
        session.close()
    assert before.masks[0].any() and np.array_equal(before.masks[0], after.masks[0])
    assert 0.5 < before.scores[0] < after.scores[0] <= 1.0


def test_one_shot_bad_input_is_a_message_and_status_1(session, tmp_path):
    said, error_lines = [], []
    assert one_shot(session, str(tmp_path / "absent.png"), "Where?", tmp_path / "vis", said.append, error_lines.append) == 1
    assert one_shot(session, str(DOG), " ", tmp_path / "vis", said.append, error_lines.append) == 1
    errors = "\n".join(error_lines)
    assert f"error: image file {tmp_path / 'absent.png'} does not exist" in errors
    assert "error: the request is empty" in errors
    assert said == [] and not (tmp_path / "vis").exists()


def test_an_answer_without_seg_reports_no_mask(session, tmp_path):
    answer = session.ask(DOG, "How many dogs?", logits_processor=scripted(session.model, "One."))
    assert answer.text == "One." and answer.masks == []
    assert save_visuals(answer, tmp_path, "dog") == [] and not list(tmp_path.iterdir())
    assert describe(answer) == f"answer: One.\n{NO_MASK_MESSAGE}\nimage: 800x534, {answer.image_tokens} image tokens"
    assert answer.image_tokens == 28  # the tiny model's limits: 112x196 pixels
    assert answer.record()["objects"] == [] and answer.scores == []


# ------------------------------------------------------------------------------- feature reuse


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_same_image_is_encoded_once(tiny_segmenter_dir):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    sam_calls = count_calls(model.sam.image_encoder)
    vision_calls = count_calls(find_vision_tower(model.vlm).patch_embed)
    reference = model.predict([load_photo("dog.jpg")], ["Where is the dog?"], 8, logits_processor=scripted(model, TWO_MASKS))[0]
    assert (len(sam_calls), len(vision_calls)) == (1, 1)

    session = InferenceSession(model, max_new_tokens=8, cache_size=2)
    answers = [session.ask(DOG, "Where is the dog?", logits_processor=scripted(model, TWO_MASKS)) for _ in range(2)]
    # The first request encoded; the second reused the SAM embedding and the image prefix's keys and
    # values, so the vision tower did not run at all.
    assert (len(sam_calls), len(vision_calls)) == (2, 2)
    assert [a.features_reused for a in answers] == [False, True]
    for answer in answers:  # the same as the uncached model (the reused prefix: up to float rounding)
        assert answer.text == reference.text
        torch.testing.assert_close(answer.result.seg_states, reference.seg_states, rtol=1e-5, atol=1e-5)
        assert all((a == b).mean() > 0.999 for a, b in zip(answer.masks, reference.masks))
    # A follow-up question about the same image reuses the features too.
    follow_up = session.ask(DOG, "And its tail?", logits_processor=scripted(model, "[SEG]"))
    assert (len(sam_calls), len(vision_calls)) == (2, 2) and follow_up.features_reused
    # Another image is encoded; the caches are bounded (2 images): the first one drops out.
    session.ask(DATA / "truck.jpg", "The wheel?")
    session.ask(DATA / "dog_with_horn.jpg", "The horn?")
    assert (len(sam_calls), len(vision_calls)) == (4, 4)
    session.ask(DOG, "Where is the dog?")
    assert (len(sam_calls), len(vision_calls)) == (5, 5)
    assert session.cache.stats["sam_hits"] == 2 and session.cache.stats["sam_misses"] == 4
    assert session.prefixes.stats == {"hits": 2, "misses": 4}
    # Detached, the model is its own self again.
    session.close()
    assert "encode_images" not in model.__dict__ and "forward" not in find_vision_tower(model.vlm).__dict__
    model.predict([load_photo("dog.jpg")], ["Where is the dog?"], 2)
    assert (len(sam_calls), len(vision_calls)) == (6, 6)


def test_one_feature_cache_per_model_at_a_time(model):
    """Two sessions' caches on one model would unhook each other on close: the second is refused."""
    first = InferenceSession(model, max_new_tokens=2)
    try:
        with pytest.raises(RuntimeError, match="already has a FeatureCache attached.*close that session"):
            InferenceSession(model, max_new_tokens=2)
    finally:
        first.close()
    second = InferenceSession(model, max_new_tokens=2)  # once the first is closed
    try:
        answers = [second.ask(DOG, "Where is the dog?") for _ in range(2)]
    finally:
        second.close()
    assert [answer.features_reused for answer in answers] == [False, True]
    assert "encode_images" not in model.__dict__


def test_ask_options_override_the_sessions(session):
    answer = session.ask(DOG, "Where is the dog?", max_new_tokens=3, logits_processor=scripted(session.model, TWO_MASKS))
    assert len(answer.result.token_ids) == 3 < session.max_new_tokens


def test_cache_looks_up_each_image_of_a_batch(model):
    dog, truck = load_photo("dog.jpg"), load_photo("truck.jpg")
    sam_calls = count_calls(model.sam.image_encoder)
    with FeatureCache(4).attached(model) as cache:
        batch = model.collate([model.prepare(image, [("Where?", None)]) for image in (dog, truck)], "left")
        sizes = batch["sam_input_size"]
        first = model.encode_images(batch["sam_pixel_values"], sizes)
        again = model.encode_images(batch["sam_pixel_values"][[1, 0, 1]], [sizes[1], sizes[0], sizes[1]])
    assert torch.equal(again, first[[1, 0, 1]])
    assert len(sam_calls) == 1 and cache.stats["sam_hits"] == 3 and cache.stats["sam_misses"] == 2


# ------------------------------------------------------------------------------- loading


def test_an_image_over_200_to_1_is_refused_with_a_message(tmp_path):
    Image.new("RGB", (3000, 10)).save(tmp_path / "strip.png")
    with pytest.raises(InputError, match=r"strip\.png is 3000x10: Qwen-VL takes images up to 200:1"):
        load_image(tmp_path / "strip.png")
    Image.new("RGB", (2000, 10)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").array.shape == (10, 2000, 3)


def test_a_downscaled_image_gets_its_boxes_and_mask_files_in_its_own_pixels(session, monkeypatch, tmp_path):
    """--max_image_side: the model sees a copy; what the person reads and saves is in the original frame."""
    always_answer(monkeypatch, session, TWO_MASKS)
    session.max_image_side = 400
    answer = session.ask(DOG, "Where is the dog?")
    assert answer.image.resized_from == (534, 800) and answer.image.array.shape[:2] == (267, 400)
    assert answer.boxes == [tuple(obj["bbox_2d"]) if obj["bbox_2d"] else None for obj in answer.objects()]
    saved = save_visuals(answer, tmp_path, "dog")
    assert [Image.open(mask).size for mask, _ in saved] == [(800, 534)] * 2
    text = describe(answer, saved)
    assert "image: 800x534 (seen downscaled to 400x267)" in text
    assert all(describe_box(box) in text for box in answer.boxes)


def test_a_downscaled_answer_is_in_the_originals_pixels_and_drawn_on_the_seen_image(monkeypatch, tmp_path):
    """The model's masks and boxes are in the original image's pixels (the session asks for them
    at that size); the overlays, drawn on the smaller image the model saw, resize each mask once."""
    import utils.inference

    sizes = []
    resize = utils.inference.resize_mask

    def counted(mask, height, width):
        sizes.append((height, width))
        return resize(mask, height, width)

    monkeypatch.setattr(utils.inference, "resize_mask", counted)
    mask = np.zeros((534, 800), bool)
    mask[20:120, 40:240] = True
    result = SimpleNamespace(text="the dog [SEG] and [SEG].", masks=[mask, np.zeros_like(mask)], scores=[0.9, None],
                             boxes=[mask_to_box(mask), None])
    image = LoadedImage(np.zeros((267, 400, 3), np.uint8), name="dog", resized_from=(534, 800))
    answer = Answer("Where is the dog?", image, result)
    record = answer.record()
    saved = save_visuals(answer, tmp_path, "dog")
    describe(answer, saved)
    render_overlay(answer)
    assert sizes == [(267, 400)] * 2
    assert [decode_rle(obj["mask"]).shape for obj in record["objects"]] == [(534, 800)] * 2
    assert answer.boxes == [(40, 20, 240, 120), None] == [obj["bbox_2d"] and tuple(obj["bbox_2d"]) for obj in record["objects"]]
    assert [np.asarray(Image.open(path)).shape[:2] for pair in saved for path in pair] == [(534, 800), (267, 400)] * 2


def test_saving_an_answer_removes_the_files_of_an_earlier_one_with_the_same_name(session, tmp_path):
    def answer(text):
        return session.ask(DOG, "Where?", logits_processor=scripted(session.model, text))

    first = save_visuals(answer(TWO_MASKS), tmp_path, "photo")
    second = save_visuals(answer("It is [SEG]."), tmp_path, "photo")
    assert len(first) == 2 and len(second) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo_mask_0.png", "photo_overlay_0.png"]


def test_saving_an_answer_keeps_the_files_of_an_image_whose_name_starts_alike(session, tmp_path):
    """"road.jpg" and "road_mask_v2.jpg" in one folder: saving road's answer keeps the other's files."""
    answer = session.ask(DOG, "Where?", logits_processor=scripted(session.model, "It is [SEG]."))
    save_visuals(answer, tmp_path, "road_mask_v2")
    save_visuals(answer, tmp_path, "road")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "road_mask_0.png", "road_mask_v2_mask_0.png", "road_mask_v2_overlay_0.png", "road_overlay_0.png"]


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model directory {tmp_path / 'nowhere'} does not exist"):
        load_segmenter(tmp_path / "nowhere")


def test_quantisation_without_bitsandbytes_or_cuda_is_a_clear_error(monkeypatch):
    with pytest.raises(ModelLoadError, match="--load_in_4bit needs (the bitsandbytes package|a CUDA GPU)"):
        quantization_config(True, False, torch.device("cpu"), torch.float32)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="--load_in_8bit needs a CUDA GPU"):
        quantization_config(False, True, torch.device("cpu"), torch.float32)
    config = quantization_config(True, False, torch.device("cuda"), torch.bfloat16)
    assert config.load_in_4bit and "visual" in config.llm_int8_skip_modules  # the vision tower stays unquantised
    with pytest.raises(ModelLoadError, match="choose one"):
        quantization_config(True, True, torch.device("cpu"), torch.float32)
    assert quantization_config(False, False, torch.device("cpu"), torch.float32) is None


# ------------------------------------------------------------------------------- batch (library)


def test_batch_lines_are_split_on_newlines_only_and_decoded_one_by_one(session, monkeypatch, tmp_path):
    """A prompt holding U+2028 (json.dumps writes it raw) is one line; a line that is not UTF-8
    is that line's error; a byte-order mark is not part of line 1."""
    always_answer(monkeypatch, session, "It is [SEG].")
    shutil.copy(DOG, tmp_path / "dog.jpg")
    lines = [
        json.dumps({"image": "dog.jpg", "prompt": "Where is the dog?\u2028Or the grass?"}, ensure_ascii=False).encode(),
        '{"image": "dog.jpg", "prompt": "caf\xe9 table?"}'.encode("latin-1"),
        json.dumps({"image": "dog.jpg", "prompt": "And the sky?"}).encode(),
    ]
    (tmp_path / "requests.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
    summary = run_batch(session, tmp_path / "requests.jsonl", tmp_path / "out.jsonl", progress=False)
    written = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")
    records = [json.loads(line) for line in written if line]
    assert (summary.total, summary.succeeded, summary.failed) == (3, 2, 1)
    assert [r["line"] for r in records] == [1, 2, 3] and records[0]["prompt"] == "Where is the dog?\u2028Or the grass?"
    assert records[1]["error"].startswith("line 2 is not UTF-8 text") and records[2]["error"] is None


def test_batch_writes_rle_masks_and_keeps_going_past_bad_lines(session, monkeypatch, tmp_path):
    always_answer(monkeypatch, session, TWO_MASKS)
    shutil.copy(DOG, tmp_path / "dog.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    lines = [
        json.dumps({"image": "dog.jpg", "prompt": "Where is the dog?"}),
        json.dumps({"image": "broken.jpg", "prompt": "Where?"}),
        json.dumps({"image": "missing.jpg", "prompt": "Where?"}),
        "",
        json.dumps({"image": str(tmp_path / "dog.jpg"), "prompt": "  "}),
        "{not json",
        json.dumps({"image": "dog.jpg", "prompt": "And the grass?"}),
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_batch(session, tmp_path / "requests.jsonl", tmp_path / "out" / "answers.jsonl", progress=False)
    assert (summary.total, summary.succeeded, summary.failed) == (6, 2, 4)
    records = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7]
    errors = [r["error"] for r in records]
    assert errors[0] is None and errors[5] is None
    assert "broken.jpg" in errors[1] and "missing.jpg does not exist" in errors[2]
    assert "request is empty" in errors[3] and "not valid JSON" in errors[4]
    for record in (records[0], records[5]):
        assert record["text"] == TWO_MASKS and len(record["objects"]) == 2
        for obj in record["objects"]:
            mask = decode_rle(obj["mask"])
            assert mask.shape == (534, 800)
            assert obj["bbox_2d"] == (list(mask_to_box(mask)) if mask.any() else None)


def test_a_batch_answered_in_batches_writes_what_one_at_a_time_writes(session, monkeypatch, tmp_path):
    """--batch_size 3: the same lines in the same order, a bad line inside a batch is still its
    own line's error, and the masks are those of one request at a time (up to float rounding:
    left padding changes the shapes of the matrix products)."""
    always_answer(monkeypatch, session, TWO_MASKS)
    ask_batch, batch_sizes = session.ask_batch, []

    def scripted_batch(images, prompts):
        batch_sizes.append(len(images))
        return ask_batch(images, prompts, logits_processor=scripted(session.model, TWO_MASKS))

    monkeypatch.setattr(session, "ask_batch", scripted_batch)
    shutil.copy(DOG, tmp_path / "dog.jpg")
    Image.fromarray(load_photo("truck.jpg")).save(tmp_path / "truck.jpg")
    lines = [
        {"image": "dog.jpg", "prompt": "Where is the dog?", "id": 1},
        {"image": "missing.jpg", "prompt": "Where?", "id": 2},
        {"image": "truck.jpg", "prompt": "Find the front wheel of the truck, please.", "id": 3},
        {"image": "truck.jpg", "prompt": "The cab?", "id": 4},
        {"image": "dog.jpg", "prompt": "", "id": 5},
    ]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    written = {}
    for size in (1, 3):
        summary = run_batch(session, tmp_path / "requests.jsonl", tmp_path / f"out{size}.jsonl", progress=False, batch_size=size)
        assert (summary.total, summary.succeeded, summary.failed) == (5, 3, 2)
        written[size] = [json.loads(line) for line in (tmp_path / f"out{size}.jsonl").read_text().splitlines()]
    assert batch_sizes == [2]  # lines 1-3 (one unreadable); then line 4 alone, through ask (line 5 is empty)
    one, three = written[1], written[3]
    assert [r["id"] for r in three] == [1, 2, 3, 4, 5] and [r["error"] for r in three] == [r["error"] for r in one]
    assert "missing.jpg does not exist" in three[1]["error"] and "request is empty" in three[4]["error"]
    for alone, together in zip(one, three):
        assert together.get("text") == alone.get("text") and together.get("width") == alone.get("width")
        for a, b in zip(alone.get("objects", []), together.get("objects", [])):
            assert (decode_rle(a["mask"]) == decode_rle(b["mask"])).mean() >= 0.99


def test_a_batch_that_fails_whole_is_answered_one_request_at_a_time(session, monkeypatch, tmp_path, caplog):
    always_answer(monkeypatch, session, TWO_MASKS)

    def out_of_memory(images, prompts):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(session, "ask_batch", out_of_memory)
    shutil.copy(DOG, tmp_path / "dog.jpg")
    (tmp_path / "requests.jsonl").write_text(
        "".join(json.dumps({"image": "dog.jpg", "prompt": f"Where is dog {k}?"}) + "\n" for k in range(3))
    )
    with caplog.at_level("ERROR"):
        summary = run_batch(session, tmp_path / "requests.jsonl", tmp_path / "out.jsonl", progress=False, batch_size=4)
    assert (summary.succeeded, summary.failed) == (3, 0)
    assert "a batch of 3 requests failed; answering them one at a time" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [TWO_MASKS] * 3 and all(r["error"] is None for r in records)


# ------------------------------------------------------------------------------- the entry point


def test_one_shot(tiny_segmenter_dir, tmp_path):
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--image", DOG, "--prompt", "Where is the dog?",
         "--max_new_tokens", "8", "--vis_save_path", tmp_path / "vis"]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("answer: ")
    assert "image: 800x534, 28 image tokens" in result.stdout
    assert_masks_reported(result.stdout, tmp_path / "vis")


FORCED_ANSWER = """
import sys
sys.path[:0] = [".", "tests"]
from model.segmenter import ReasonSegmenter
from test_inference import scripted
_generate = ReasonSegmenter.generate
def generate(self, batch, max_new_tokens=64, logits_processor=None, **kwargs):
    forced = scripted(self, {answer!r})
    forced.extend(logits_processor or [])  # the session's own, after it (as the session puts its own last)
    return _generate(self, batch, max_new_tokens=max_new_tokens, logits_processor=forced, **kwargs)
ReasonSegmenter.generate = generate
"""


def check_answer_json(record, prompt):
    """The JSON answer schema (README, "Boxes: grounding and detection")."""
    assert set(record) == {"prompt", "text", "objects", "width", "height", "image_tokens", "downscaled_to"}
    assert record["prompt"] == prompt and (record["width"], record["height"]) == (800, 534)
    assert record["image_tokens"] == 28 and record["downscaled_to"] is None
    assert len(record["objects"]) == record["text"].count("[SEG]")
    for obj in record["objects"]:
        assert set(obj) == {"bbox_2d", "label", "score", "area", "mask"}
        mask = decode_rle(obj["mask"])
        assert mask.shape == (534, 800) and obj["area"] == mask.sum()
        box = mask_to_box(mask)
        assert obj["bbox_2d"] == (list(box) if box is not None else None)
        assert (obj["score"] is None) == (box is None) and (box is None or 0.5 < obj["score"] <= 1.0)


def test_json_format_one_shot(tiny_segmenter_dir, tmp_path):
    """One JSON object on stdout, one line; the answer is forced (a random tiny model rarely says [SEG])."""
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--image", DOG, "--prompt", "Where is the dog?",
         "--max_new_tokens", "32", "--vis_save_path", tmp_path / "vis", "--format", "json"],
        wrapper=FORCED_ANSWER.format(answer="the dog [SEG] and [SEG] (its tail)."),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    check_answer_json(record, "Where is the dog?")
    assert record["text"] == "the dog [SEG] and [SEG] (its tail)."
    assert [obj["label"] for obj in record["objects"]] == ["the dog", "its tail"]
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [
        "dog_mask_0.png", "dog_mask_1.png", "dog_overlay_0.png", "dog_overlay_1.png"]


def test_json_format_interactive(tiny_segmenter_dir, tmp_path):
    """Every request gives one JSON line on stdout (an error too); questions and goodbye on stderr."""
    stdin = "\n".join(["Where is the dog?", str(DOG), "Where is the grass?", str(tmp_path / "nope.jpg"), ""]) + "\n"
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--max_new_tokens", "8",
         "--vis_save_path", tmp_path / "vis", "--format", "json"],
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    answer, failure = (json.loads(line) for line in result.stdout.splitlines())
    check_answer_json(answer, "Where is the dog?")
    assert failure == {"prompt": "Where is the grass?", "image": str(tmp_path / "nope.jpg"),
                       "error": f"image file {tmp_path / 'nope.jpg'} does not exist"}
    assert "Request (empty to quit):" in result.stderr and "bye (1 requests answered" in result.stderr


def assert_masks_reported(stdout: str, vis_dir, prefix="dog"):
    """One mask PNG and one overlay per [SEG] of each answer, or "no mask"."""
    answers = [line for line in stdout.splitlines() if "answer: " in line]
    n_seg = sum(line.count("[SEG]") for line in answers)
    files = sorted(p.name for p in vis_dir.glob(f"{prefix}*")) if vis_dir.exists() else []
    assert len([f for f in files if "_mask_" in f]) == len([f for f in files if "_overlay_" in f]) == n_seg
    assert stdout.count("box (x0, y0, x1, y1)") + stdout.count("empty mask") == n_seg
    assert stdout.count(NO_MASK_MESSAGE) == sum(1 for line in answers if "[SEG]" not in line)


def test_batch_entry_point(tiny_segmenter_dir, tmp_path):
    """Failed lines do not stop the batch, but they make the exit status 1 (a script or a cluster
    job must be able to tell), with a last line counting them and naming where their errors are."""
    shutil.copy(DOG, tmp_path / "dog.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(DOG.read_bytes()[:300])
    (tmp_path / "in.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [
            {"image": "dog.jpg", "prompt": "Where is the dog?"},
            {"image": "corrupt.jpg", "prompt": "Where is the dog?"},
            {"image": "gone.jpg", "prompt": "Where is the dog?"},
        ]) + "\n"
    )
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--input_jsonl", tmp_path / "in.jsonl",
         "--output_jsonl", tmp_path / "out.jsonl", "--max_new_tokens", "8"]
    )
    assert result.returncode == 1, result.stderr
    assert "1 of 3 requests answered, 2 failed" in result.stdout
    assert result.stderr.rstrip().splitlines()[-1] == (
        f'ERROR inference: 2 of 3 requests failed; each one\'s error is in the "error" field of its line in {tmp_path / "out.jsonl"}')
    assert "segmenting" in result.stderr and "3/3" in result.stderr  # the progress bar
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 3
    good, corrupt, gone = records
    assert good["error"] is None and isinstance(good["text"], str) and (good["width"], good["height"]) == (800, 534)
    assert good["image_tokens"] == 28
    assert len(good["objects"]) == good["text"].count("[SEG]")
    assert all(decode_rle(obj["mask"]).shape == (534, 800) for obj in good["objects"])
    assert "corrupt.jpg" in corrupt["error"] and "gone.jpg does not exist" in gone["error"]
    assert "Traceback" not in result.stderr


def test_batch_exit_status_is_0_when_every_request_is_answered(tiny_segmenter_dir, tmp_path):
    """Paths with spaces and non-ASCII characters, relative (to the input file) and absolute;
    both requests answered as one batch (--batch_size 2)."""
    (tmp_path / "fotos und Bilder").mkdir()
    shutil.copy(DOG, tmp_path / "fotos und Bilder" / "der Hund é.jpg")
    (tmp_path / "in.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in [
            {"image": "fotos und Bilder/der Hund é.jpg", "prompt": "Wo ist der Hund?"},
            {"image": str(DOG), "prompt": "Where is the dog?"},
        ]) + "\n", encoding="utf-8",
    )
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--input_jsonl", tmp_path / "in.jsonl",
         "--max_new_tokens", "4", "--no_progress", "--batch_size", "2"]
    )
    assert result.returncode == 0, result.stderr
    assert "2 of 2 requests answered, 0 failed" in result.stdout and "ERROR" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "in.out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["image"], r["error"], r["width"]) for r in records] == [
        ("fotos und Bilder/der Hund é.jpg", None, 800), (str(DOG), None, 800)]


def test_batch_lines_carry_the_requests_other_fields(tiny_segmenter_dir, tmp_path):
    """An "id" (or any other field) comes back on its answer's line, a failed line's too, so that
    answers can be matched to requests by more than their order; a field named like one the
    answer writes ("text", "error"...) is kept in the line's "input" object, not overwritten."""
    shutil.copy(DOG, tmp_path / "dog.jpg")
    requests = [
        {"id": "a17", "image": "dog.jpg", "prompt": "Where is the dog?", "meta": {"split": "val", "k": [1, 2]}},
        {"id": 18, "image": "gone.jpg", "prompt": "Where is the dog?"},
        {"id": "a19", "image": "dog.jpg", "prompt": "  ", "text": "reference answer", "error": "mine", "input": 3},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--input_jsonl", tmp_path / "in.jsonl",
         "--max_new_tokens", "4", "--no_progress"]
    )
    assert result.returncode == 1, result.stderr
    good, gone, clash = (json.loads(line) for line in (tmp_path / "in.out.jsonl").read_text().splitlines())
    assert good["id"] == "a17" and good["meta"] == {"split": "val", "k": [1, 2]} and good["error"] is None
    assert "input" not in good and isinstance(good["text"], str)
    assert gone["id"] == 18 and "gone.jpg does not exist" in gone["error"]
    assert clash["id"] == "a19" and "request is empty" in clash["error"] and "text" not in clash
    assert clash["input"] == {"text": "reference answer", "error": "mine", "input": 3}
    assert list(clash)[-1] == "input"


def test_an_empty_batch_file_is_refused_naming_it(tiny_segmenter_dir, tmp_path, monkeypatch, capsys, session):
    """No request line (empty, or blank lines only) is a mistake, not "0 of 0 requests answered"."""
    (tmp_path / "blank.jsonl").write_text("\n  \r\n\n")
    with pytest.raises(InputError, match=f"input file {tmp_path / 'blank.jsonl'} has no requests"):
        run_batch(session, tmp_path / "blank.jsonl", tmp_path / "out.jsonl", progress=False)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    monkeypatch.setattr("model.loading.load_segmenter", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sys, "argv", ["inference.py", "--version", str(tiny_segmenter_dir("qwen2_5_vl")),
                                      "--input_jsonl", str(tmp_path / "empty.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "inference.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert f"error: --input_jsonl: input file {tmp_path / 'empty.jsonl'} has no requests" in capsys.readouterr().err
    assert not (tmp_path / "empty.out.jsonl").exists()


CTRL_C_ON_SECOND_REQUEST = """
import os, signal, time
from model.segmenter import ReasonSegmenter
_generate = ReasonSegmenter.generate
calls = []
def generate(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # Ctrl-C while the second request is being answered
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    return _generate(self, *args, **kwargs)
ReasonSegmenter.generate = generate
"""


def test_ctrl_c_ends_a_batch_with_its_summary_and_status_130(tiny_segmenter_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text(
        "\n".join(json.dumps({"id": n, "image": str(DOG), "prompt": f"Where is dog {n}?"}) for n in range(3)) + "\n")
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--input_jsonl", tmp_path / "in.jsonl",
         "--output_jsonl", tmp_path / "out.jsonl", "--max_new_tokens", "4", "--no_progress"],
        wrapper=CTRL_C_ON_SECOND_REQUEST,
    )
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert f"interrupted after 1 of 3 requests: 1 answered, 0 failed; their answers are in {tmp_path / 'out.jsonl'}" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["error"]) for r in records] == [(0, None)]


def test_interactive_loop_reuses_the_image_and_survives_bad_paths(tiny_segmenter_dir, tmp_path):
    stdin = "\n".join([
        "Where is the dog?", str(DOG),
        "Where is the grass?", str(tmp_path / "nope.jpg"),
        "And the grass?", f"'{DOG}'",
        "",
    ]) + "\n"
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--max_new_tokens", "8",
         "--vis_save_path", tmp_path / "vis"],
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("answer: ") == 2
    assert f"error: image file {tmp_path / 'nope.jpg'} does not exist" in result.stdout
    assert "reused the cached image features" in result.stderr
    assert "bye (2 requests answered" in result.stdout
    assert_masks_reported(result.stdout, tmp_path / "vis")


def test_interactive_loop_takes_paths_as_terminals_paste_them(session, monkeypatch, tmp_path):
    r"""Dragged into a terminal, a path comes quoted (GNOME: '/a b.jpg', '/it'\''s.jpg') or
    backslash-escaped (macOS: /a\ b.jpg); a name that itself holds a backslash is taken as typed."""
    always_answer(monkeypatch, session, "It is [SEG].")
    for name in ("my dog.jpg", "it's a dog.jpg", "back\\slash.jpg"):
        shutil.copy(DOG, tmp_path / name)
    typed = [
        str(tmp_path / "my dog.jpg").replace(" ", "\\ ") + " ",  # macOS adds a space too
        "'" + str(tmp_path / "it's a dog.jpg").replace("'", "'\\''") + "'",
        str(tmp_path / "back\\slash.jpg"),
    ]
    # Paths that name nothing, which the file system refuses to even look up: an error, not the end.
    typed[1:1] = ["~nosuchuser_xyz/dog.jpg", "/" + "a" * 300 + ".jpg"]
    inputs = iter([text for path in typed for text in ("Where is the dog?", path)])
    said = []
    assert interactive_loop(session, tmp_path / "vis", said.append, lambda question: next(inputs, "")) == 3, said
    assert [line.split(":")[0] for line in said if line.startswith("error")] == ["error", "error"], said
    assert sorted(p.name for p in (tmp_path / "vis").glob("*_mask_0.png")) == [
        "back\\slash_1_mask_0.png", "it's a dog_1_mask_0.png", "my dog_1_mask_0.png"]


def test_interactive_loop_survives_bytes_that_are_not_utf8(tiny_segmenter_dir, tmp_path):
    """On a strict-UTF-8 stdin (a UTF-8 locale other than C.UTF-8) such bytes raised
    UnicodeDecodeError, which ended the loop and lost the piped lines after them."""
    latin1_name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    shutil.copy(DOG, latin1_name)
    stdin = b"\n".join([
        b"Where is the caf\xe9 dog?", os.fsencode(DOG),
        b"Where is the dog?", latin1_name,
        b"And here?", os.fsencode(tmp_path) + b"/gone\xe9.jpg",
        b"Where is the dog?", os.fsencode(DOG),
        b"",
    ]) + b"\n"
    result = run_entry(
        ["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--max_new_tokens", "4",
         "--vis_save_path", tmp_path / "vis"],
        stdin=stdin, wrapper="import sys\nsys.stdin.reconfigure(errors='strict')\nsys.stdout.reconfigure(errors='strict')",
    )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "error: the request is not UTF-8 text (character 17); type it again" in stdout
    assert f"error: image file {tmp_path}/gone\\udce9.jpg does not exist" in stdout
    assert stdout.count("answer: ") == 2 and "bye (2 requests answered" in stdout


def test_interactive_loop_reports_what_goes_wrong_after_the_answer_and_goes_on(session, monkeypatch, tmp_path):
    """Saving the files (disk full, no permission) and reading the next line (bytes that are not
    UTF-8, from a caller's own reader) fail with one line each, not the end of the session; Ctrl-C
    while saving ends the loop as Ctrl-C during the answer does."""
    always_answer(monkeypatch, session, "It is [SEG].")
    real_save = Image.Image.save
    failures = iter([OSError(28, "No space left on device"), None, None, KeyboardInterrupt()])  # 2 files an answer

    def save(image, path, *args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    typed = iter([b"Where?\xe9", "Where is the dog?", str(DOG), "And now?", str(DOG), "And then?", str(DOG), "Never asked"])

    def read(question):
        text = next(typed)
        if isinstance(text, bytes):
            return text.decode("utf-8")  # raises, as input() on a strict-UTF-8 stdin
        return text

    said = []
    assert interactive_loop(session, tmp_path / "vis", said.append, read) == 3, said
    assert said[0] == "error: what was typed is not UTF-8 text (unexpected end of data at byte 6); type it again"
    assert said[1] == f"error: the answer's mask files could not be saved in {tmp_path / 'vis'} ([Errno 28] No space left on device)"
    assert said[2].startswith("answer: It is [SEG].") and " -> " not in said[2]  # the answer, without files
    assert said[3].startswith("answer: ") and f" -> {tmp_path / 'vis'}" in said[3]
    assert said[4:] == ["interrupted"]


def test_a_new_interactive_session_does_not_overwrite_an_earlier_ones_files(session, monkeypatch, tmp_path):
    """Files are numbered per image name, after the highest already in the folder; "dog" does
    not count the files of "dog_2" (another image) nor the one-shot's unnumbered ones."""
    always_answer(monkeypatch, session, "It is [SEG].")
    vis = tmp_path / "vis"
    vis.mkdir()
    for name in ("dog_2_1_mask_0.png", "dog_mask_0.png", "dog_7_overlay_0.png"):
        (vis / name).write_bytes(b"earlier")

    def run_session(*requests):
        inputs = iter([text for prompt in requests for text in (prompt, str(DOG))])
        assert interactive_loop(session, vis, lambda line: None, lambda question: next(inputs, "")) == len(requests)

    run_session("Where is the dog?", "And its tail?")
    run_session("Where is the dog?")
    assert sorted(p.name for p in vis.glob("dog_*_mask_0.png")) == sorted(
        ["dog_2_1_mask_0.png", "dog_8_mask_0.png", "dog_9_mask_0.png", "dog_10_mask_0.png"])
    assert all((vis / name).read_bytes() == b"earlier" for name in ("dog_2_1_mask_0.png", "dog_mask_0.png", "dog_7_overlay_0.png"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--version", "/no/such/model"], "error: model directory /no/such/model does not exist"),
        (["--load_in_4bit"], "error: --load_in_4bit needs the bitsandbytes package"),
    ],
)
def test_clear_messages_instead_of_tracebacks(tiny_segmenter_dir, monkeypatch, extra, message):
    """The entry point exits with a one-line message (run in-process: the check is the same)."""
    if "bitsandbytes" in message and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    argv = ["inference.py", "--version", str(tiny_segmenter_dir("qwen2_5_vl")), *extra, "--image", str(DOG), "--prompt", "Where?"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "inference.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith(message)  # printed to stderr by Python, exit status 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input_jsonl", "{tmp}"], "--input_jsonl {tmp} is not a file"),
        (["--input_jsonl", "{tmp}/in.jsonl", "--output_jsonl", "{tmp}"], "--output_jsonl {tmp} is a directory"),
        (["--input_jsonl", "{tmp}/in.jsonl", "--image_root", "{tmp}/nowhere"], "--image_root {tmp}/nowhere is not a directory"),
        (["--image", str(DOG), "--prompt", "Where?", "--vis_save_path", "{tmp}/in.jsonl"], "--vis_save_path {tmp}/in.jsonl is a file"),
        (["--max_image_side", "-1"], "--max_image_side must be at least 0 (0: no downscale), got -1"),
        (["--cache_size", "-1"], "--cache_size must be at least 0 (0: no reuse), got -1"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
        (["--input_jsonl", "{tmp}/in.jsonl", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--image", str(DOG), "--prompt", "Where?", "--batch_size", "4"], "--batch_size is for a batch (--input_jsonl)"),
    ],
)
def test_unusable_paths_and_values_are_refused_before_the_model_loads(tiny_segmenter_dir, tmp_path, monkeypatch, capsys, extra, message):
    """Each would otherwise fail after the model loaded (a traceback), or, a negative
    --max_image_side, shrink every image to one pixel."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": str(DOG), "prompt": "Where?"}) + "\n")
    monkeypatch.setattr("model.loading.load_segmenter", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["inference.py", "--version", str(tiny_segmenter_dir("qwen2_5_vl")), *(a.format(tmp=tmp_path) for a in extra)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "inference.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert f"error: {message.format(tmp=tmp_path)}" in capsys.readouterr().err


def test_requests_from_many_threads_run_the_model_on_one(session, monkeypatch):
    """Compiled CUDA graphs are per thread (pytorch/pytorch#123177): the Gradio app's requests
    arrive on a pool of threads, and the session must still run the model on one."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model_threads = []
    predict = session.model.predict

    def recording_predict(*args, **kwargs):
        model_threads.append(threading.get_ident())
        return predict(*args, **kwargs)

    monkeypatch.setattr(session.model, "predict", recording_predict)
    with ThreadPoolExecutor(max_workers=3) as callers:
        answers = list(callers.map(lambda q: session.ask(DOG, q), ["Where?", "What?", "Which?", "Why?"]))
    assert len(answers) == 4 and len(model_threads) == 4
    assert len(set(model_threads)) == 1 and model_threads[0] != threading.get_ident()


def test_ctrl_c_ends_the_answer_being_written(session):
    """Ctrl-C reaches the asking thread; the worker must stop at its next token, not write the rest
    of the answer (minutes on a CPU) while the process waits for it at exit."""
    import signal
    import threading
    import time

    calls, writing, sent = [], threading.Event(), threading.Event()
    a_token = session.model.processor.tokenizer.convert_tokens_to_ids("a")

    def slow_endless(input_ids, scores):  # "a a a ...", a tenth of a second a token
        calls.append(1)
        if len(calls) == 3:  # still writing when Ctrl-C comes
            writing.set()
            sent.wait(30)
        time.sleep(0.1)
        scores = torch.full_like(scores, -1e9)
        scores[:, a_token] = 0
        return scores

    def ctrl_c():
        writing.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        sent.set()

    threading.Thread(target=ctrl_c).start()
    with pytest.raises(KeyboardInterrupt):
        session.ask(DOG, "Where is the dog?", max_new_tokens=60, logits_processor=slow_endless)
    session._worker.submit(lambda: None).result()  # the worker is done with the interrupted request
    assert len(calls) < 10  # 60 without the stop
    # The next request is not ended early.
    answer = session.ask(DOG, "Where is the dog?", logits_processor=scripted(session.model, TWO_MASKS))
    assert answer.text == TWO_MASKS


def test_warm_up_compiles_the_step_a_first_request_then_reuses(tiny_segmenter_dir):
    """tools/app.py warms up on its examples so that no visitor waits for the compile."""
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    # Answers up to a whole cache-length step long: a short warm-up would compile a shorter cache.
    session = InferenceSession(model, max_new_tokens=CACHE_LENGTH_STEP, decoding="compiled")
    try:
        seconds = session.warm_up(DOG, "Where is the dog?")
        decoder = model._decoders["compiled"]
        assert seconds > 0 and decoder.compiled and len(decoder.compile_seconds) == 1
        compiled_shapes = dict(decoder.compile_seconds)
        answer = session.ask(DOG, "Where is the dog?", logits_processor=scripted(model, TWO_MASKS))
        assert decoder.compile_seconds == compiled_shapes  # the request compiled nothing
        assert answer.features_reused  # and found the image warmed up
    finally:
        session.close()


def test_a_file_asked_about_again_is_decoded_once(session, tmp_path, monkeypatch):
    """The same path, unchanged: its decoded image is reused (no JPEG decode per follow-up); the
    file rewritten (another modification time or size): decoded again."""
    import utils.inference as inference

    photo = tmp_path / "dog.jpg"
    shutil.copy(DOG, photo)
    decoded = []
    real_load = inference.load_image
    monkeypatch.setattr(inference, "load_image", lambda *a, **k: (decoded.append(a[0]), real_load(*a, **k))[1])
    first = session.ask(str(photo), "Where is the dog?", logits_processor=scripted(session.model, "[SEG]"))
    again = session.ask(photo, "And its tail?", logits_processor=scripted(session.model, "[SEG]"))
    assert len(decoded) == 1 and again.image is first.image and not first.image.array.flags.writeable
    Image.open(DOG).rotate(90, expand=True).save(photo)
    turned = session.ask(str(photo), "Where is the dog?", logits_processor=scripted(session.model, "[SEG]"))
    assert len(decoded) == 2 and turned.image.array.shape[:2] == first.image.array.shape[1::-1]


def test_the_session_stores_no_vision_outputs_as_it_reuses_image_prefixes(session):
    """A follow-up runs neither the vision tower (its image prefix is reused) nor, on the first
    request, the vision store's hashing of the pixels: the session keeps none."""
    from model.image_cache import find_vision_tower

    calls = []
    hook = find_vision_tower(session.model.vlm).register_forward_hook(lambda *_: calls.append(1))
    try:
        for question in ("Where is the dog?", "And its tail?"):
            session.ask(DOG, question, logits_processor=scripted(session.model, "[SEG]"))
    finally:
        hook.remove()
    assert len(calls) == 1 and session.prefixes.stats["hits"] == 1
    assert session.cache.stats["vision_misses"] == session.cache.stats["vision_hits"] == 0


def test_batch_size_defaults_to_a_batch_on_cuda_only():
    """inference.py --batch_size: unset, batch mode answers 8 requests together on CUDA (3.8x the
    requests per second on an H200) and one at a time on a CPU; a given value is kept."""
    from utils.inference_cli import resolve_batch_size

    assert resolve_batch_size(None, torch.device("cuda")) == 8
    assert resolve_batch_size(None, "cuda:1") == 8
    assert resolve_batch_size(None, torch.device("cpu")) == 1
    assert resolve_batch_size(3, torch.device("cpu")) == 3
    assert resolve_batch_size(1, torch.device("cuda")) == 1


def test_a_batch_out_of_gpu_memory_halves_the_batches_after_it(session, monkeypatch, tmp_path, caplog):
    """--batch_size 8 is the CUDA default; on a card too small for it, the first batch that runs
    out of memory is answered one request at a time and the lines after it go in halved batches,
    instead of every batch failing first."""
    always_answer(monkeypatch, session, TWO_MASKS)
    tried = []
    answer_batch = session.ask_batch

    def small_memory(images, prompts):
        tried.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return answer_batch(images, prompts)

    monkeypatch.setattr(session, "ask_batch", small_memory)
    shutil.copy(DOG, tmp_path / "dog.jpg")
    (tmp_path / "requests.jsonl").write_text(
        "".join(json.dumps({"image": "dog.jpg", "prompt": f"Where is dog {k}?", "id": k}) + "\n" for k in range(9))
    )
    with caplog.at_level("WARNING"):
        summary = run_batch(session, tmp_path / "requests.jsonl", tmp_path / "out.jsonl", progress=False, batch_size=4)
    assert (summary.succeeded, summary.failed) == (9, 0)
    assert tried == [4, 2, 2]  # lines 0-3 fail together (then one by one), 4-5 and 6-7 as pairs, 8 alone
    assert "a batch of 4 requests ran out of GPU memory; answering the next lines in batches of 2" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(9)) and all(r["error"] is None for r in records)
    assert [r["text"] for r in records[:4]] == [TWO_MASKS] * 4  # answered one at a time, by ask
