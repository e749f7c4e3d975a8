"""model/decoding.py: our greedy loop (static cache, compiled step, image-prefix reuse) answers
exactly what transformers' ``generate`` answers, on all three Qwen-VL generations."""

import logging

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import load_photo
from model import decoding
from model.decoding import CACHE_LENGTH_STEP, PrefixCache, resolve_decoding
from model.image_cache import find_vision_tower
from model.segmenter import ReasonSegmenter
from model.vlm import LoraSettings

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
ANSWER = "Sure, [SEG] and [SEG]."


class ForcedAnswer(LogitsProcessor):
    """Makes greedy decoding produce ``ids`` after the prompt (so answers contain [SEG])."""

    def __init__(self, ids: list[int], prompt_length: int) -> None:
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -1e9)
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


def forced(model, batch, answer=ANSWER) -> LogitsProcessorList:
    tokenizer = model.processor.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return LogitsProcessorList([ForcedAnswer(ids, batch["input_ids"].shape[1])])


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tiny_vlm_dir):
    torch.manual_seed(0)
    return ReasonSegmenter.from_components(tiny_vlm_dir(request.param), "tiny", lora=LoraSettings()).eval()


@pytest.fixture(scope="module")
def photos():
    return load_photo("dog.jpg"), load_photo("truck.jpg")


def left_padded_batch(model, photos):
    dog, truck = photos
    prompts = ["Where is the dog?", "Find the front wheel of the truck in this picture, please."]
    return model.collate([model.prepare(image, [(p, None)]) for image, p in zip((dog, truck), prompts)], "left")


def assert_same_answers(ours, reference):
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
        if theirs.seg_states is None:
            assert mine.seg_states is None
            continue
        torch.testing.assert_close(mine.seg_states, theirs.seg_states, rtol=1e-4, atol=1e-4)
        for a, b in zip(mine.masks, theirs.masks):
            assert (a == b).mean() >= 0.999


@pytest.mark.parametrize("answer", [None, ANSWER], ids=["free", "forced_seg"])
def test_eager_loop_equals_transformers_generate_on_a_left_padded_batch(model, photos, answer):
    batch = left_padded_batch(model, photos)
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    options = {} if answer is None else {"logits_processor": forced(model, batch, answer)}
    reference = model.generate(batch, 20, decoding="transformers", **options)
    ours = model.generate(batch, 20, decoding="eager", **options)
    assert_same_answers(ours, reference)
    if answer is not None:
        assert all(len(result.masks) == 2 for result in ours)
    else:  # random weights: the free answer runs to the limit, token for token
        assert all(len(result.token_ids) == 20 for result in ours)


class Recording(LogitsProcessor):
    """Keeps a copy of every sequence a logits processor is shown."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


def test_a_logits_processor_sees_what_transformers_shows_it(model, photos):
    """Prompt and answer so far, left padding included, at every step (ours keeps them in one
    buffer and shows a view of it)."""
    batch = left_padded_batch(model, photos)
    seen = {}
    for mode in ("transformers", "eager"):
        recording = Recording()
        model.generate(batch, 8, decoding=mode, logits_processor=LogitsProcessorList([recording, *forced(model, batch)]))
        seen[mode] = recording.seen
    # transformers' path generates one token more, for the state of a [SEG] chosen last.
    assert len(seen["eager"]) == 8 and len(seen["transformers"]) >= 8
    for ours, theirs in zip(seen["eager"], seen["transformers"]):
        assert torch.equal(ours, theirs)


def test_a_seg_at_the_token_limit_gets_its_state(model, photos):
    batch = model.collate([model.prepare(photos[0], [("Where?", None)])], "left")
    limit = len(model.processor.tokenizer("Sure, [SEG]", add_special_tokens=False)["input_ids"])
    [ours] = model.generate(batch, limit, decoding="eager", logits_processor=forced(model, batch, "Sure, [SEG]"))
    [reference] = model.generate(batch, limit, decoding="transformers", logits_processor=forced(model, batch, "Sure, [SEG]"))
    assert ours.text == "Sure, [SEG]" and len(ours.masks) == 1
    assert_same_answers([ours], [reference])


def test_follow_up_reuses_the_image_prefix_and_answers_the_same(model, photos):
    dog, _ = photos
    vision_calls = []
    hook = find_vision_tower(model.vlm).register_forward_hook(lambda *_: vision_calls.append(1))
    try:
        cache = PrefixCache(max_items=2)
        question = "And what about its tail?"
        single = model.collate([model.prepare(dog, [(question, None)])], "left")
        fresh = model.generate(single, 16, decoding="eager", logits_processor=forced(model, single))
        model.predict([dog], ["Where is the dog?"], max_new_tokens=8, decoding="eager", prefix_cache=cache)
        calls_before = len(vision_calls)
        follow_up = model.generate(single, 16, decoding="eager", prefix_cache=cache, logits_processor=forced(model, single))
    finally:
        hook.remove()
    assert cache.stats == {"hits": 1, "misses": 1} and len(cache) == 1
    assert len(vision_calls) == calls_before, "the vision tower ran again for a cached image prefix"
    assert_same_answers(follow_up, fresh)
    # A different image is not served from the cache.
    other = model.collate([model.prepare(photos[1], [(question, None)])], "left")
    model.generate(other, 4, decoding="eager", prefix_cache=cache)
    assert cache.stats["misses"] == 2 and len(cache) == 2


def test_prefix_cache_is_bounded_and_only_serves_single_requests(model, photos):
    cache = PrefixCache(max_items=1)
    dog, truck = photos
    model.predict([dog], ["Where is the dog?"], max_new_tokens=2, decoding="eager", prefix_cache=cache)
    model.predict([truck], ["Where is the truck?"], max_new_tokens=2, decoding="eager", prefix_cache=cache)
    assert len(cache) == 1
    model.generate(left_padded_batch(model, photos), 2, decoding="eager", prefix_cache=cache)
    assert cache.stats == {"hits": 0, "misses": 2}, "a batch of two must not use the one-request prefix cache"
    with pytest.raises(ValueError, match="max_items"):
        PrefixCache(max_items=-1)


def test_prefix_cache_does_not_serve_a_prefix_across_a_dtype_change(tiny_vlm_dir, photos):
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    cache = PrefixCache()
    model.predict([photos[0]], ["Where is the dog?"], max_new_tokens=2, decoding="eager", prefix_cache=cache)
    model.to(torch.bfloat16)
    [answer] = model.predict([photos[0]], ["And its tail?"], max_new_tokens=2, decoding="eager", prefix_cache=cache)
    assert cache.stats == {"hits": 0, "misses": 2} and len(answer.token_ids) == 2
    model.predict([photos[0]], ["And its head?"], max_new_tokens=2, decoding="eager", prefix_cache=cache)
    assert cache.stats["hits"] == 1, "a follow-up in the new dtype must reuse the prefix of that dtype"


def test_compiled_step_equals_eager_and_compiles_once_per_shape(model, photos):
    """torch.compile(fullgraph=True) captures the whole step (no graph break) on every generation."""
    torch._dynamo.reset()
    batch = left_padded_batch(model, photos)
    processor = {"logits_processor": forced(model, batch)}
    eager = model.generate(batch, 12, decoding="eager", **processor)
    compiled = model.generate(batch, 12, decoding="compiled", **processor)
    assert_same_answers(compiled, eager)
    decoder = model._decoders["compiled"]
    assert decoder.compiled, "compiling fell back to eager"
    assert list(decoder.compile_seconds) == [(2, CACHE_LENGTH_STEP)]
    # A second request of the same shape, and a follow-up, reuse the compiled step.
    again = model.generate(batch, 12, decoding="compiled", **processor)
    assert_same_answers(again, eager)
    cache = PrefixCache()
    single = model.collate([model.prepare(photos[0], [("Where is the dog?", None)])], "left")
    first = model.generate(single, 12, decoding="compiled", prefix_cache=cache, logits_processor=forced(model, single))
    second = model.generate(single, 12, decoding="compiled", prefix_cache=cache, logits_processor=forced(model, single))
    assert cache.stats["hits"] == 1
    assert_same_answers(second, first)
    assert sorted(decoder.compile_seconds) == [(1, CACHE_LENGTH_STEP), (2, CACHE_LENGTH_STEP)]


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny_vlm_dir, photos, monkeypatch, caplog):
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    batch = left_padded_batch(model, photos)

    def broken_compile(function, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return run

    reference = model.generate(batch, 6, decoding="eager")
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="model.decoding"):
        answers = model.generate(batch, 6, decoding="compiled")
    assert "no compiler here" in caplog.text
    assert not model._decoders["compiled"].compiled
    assert_same_answers(answers, reference)


def test_compiled_decoding_outlives_torchs_recompile_limit(tiny_vlm_dir, photos, monkeypatch, caplog):
    """Each (batch, cache length) shape is a recompile of the step: past torch's recompile limit
    decoding stays compiled, and past MAX_COMPILED_SHAPES only the new shape decodes eagerly."""
    torch._dynamo.reset()
    compile_ = torch.compile  # dynamo without inductor: the same guards and recompiles, compiled fast
    monkeypatch.setattr(torch, "compile", lambda function, **_: compile_(function, backend="eager", fullgraph=True, dynamic=False))
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    batch = model.collate([model.prepare(photos[0], [("Where is the dog?", None)])], "left")
    shapes = torch._dynamo.config.recompile_limit + 1

    def answer(k: int, mode: str = "compiled"):  # k + 1 steps of cache length
        return model.generate(batch, k * CACHE_LENGTH_STEP + 1, decoding=mode, logits_processor=forced(model, batch))

    for k in range(shapes):
        answer(k)
    decoder = model._decoders["compiled"]
    assert decoder.compiled, "hitting torch's recompile limit turned compiled decoding off"
    assert len(decoder.compile_seconds) == shapes and not decoder.eager_shapes
    monkeypatch.setattr(decoding, "MAX_COMPILED_SHAPES", shapes)
    with caplog.at_level(logging.WARNING, logger="model.decoding"):
        beyond = answer(shapes)
    [eager_shape] = decoder.eager_shapes
    assert eager_shape not in decoder.compile_seconds and f"cache {eager_shape[1]} decodes eagerly" in caplog.text
    assert_same_answers(beyond, answer(shapes, "eager"))
    answer(0)  # a compiled shape is still served compiled
    assert decoder.compiled and len(decoder.compile_seconds) == shapes and len(decoder.eager_shapes) == 1


def test_eager_decoding_keeps_one_static_cache(tiny_vlm_dir, photos):
    """A kept cache holds its memory (0.8 GB for 8 rows of 1,792 tokens at 7B) and only a compiled
    step needs its tensors again: eager decoding keeps the last one."""
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    single = model.collate([model.prepare(photos[0], [("Where is the dog?", None)])], "left")
    for batch, max_new_tokens in ((single, 4), (left_padded_batch(model, photos), 4), (single, CACHE_LENGTH_STEP + 1)):
        model.generate(batch, max_new_tokens, decoding="eager")
    caches = model._decoders["eager"]._caches
    assert len(caches) == 1 and caches.get((1, 2 * CACHE_LENGTH_STEP)) is not None


def test_decoding_modes_resolve_by_device():
    assert resolve_decoding("auto", torch.device("cuda")) == "compiled"
    assert resolve_decoding("auto", torch.device("cpu")) == "eager"
    assert resolve_decoding("transformers", torch.device("cuda")) == "transformers"
    with pytest.raises(ValueError, match="auto, compiled, eager, transformers"):
        resolve_decoding("fast", torch.device("cpu"))


def test_sampling_options_go_to_transformers_generate(model, photos):
    batch = model.collate([model.prepare(photos[0], [("Where is the dog?", None)])], "left")
    # num_beams is an option only transformers' generate takes: same greedy answer with 1 beam.
    [through_transformers] = model.generate(batch, 6, num_beams=1)
    [ours] = model.generate(batch, 6, decoding="eager")
    assert through_transformers.token_ids == ours.token_ids


def test_lagged_stop_check_answers_the_same_one_step_later(tiny_vlm_dir, photos, monkeypatch):
    """On CUDA the loop reads the step before's "all rows stopped" flag (StopFlags, lagged) so the
    device never waits for the host: it runs one step past the last stop, and the answers, cut at
    each row's first stop token, are the same. Run here on the CPU with the lag forced on."""
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    batch = left_padded_batch(model, photos)
    calls = {}

    def counted(name):
        processors = forced(model, batch, "Sure, [SEG].")

        def count(input_ids, scores):
            calls[name] = calls.get(name, 0) + 1
            return processors(input_ids, scores)
        return count

    immediate = model.generate(batch, 20, decoding="eager", logits_processor=counted("immediate"))
    stop_flags = decoding.StopFlags
    monkeypatch.setattr(decoding, "StopFlags", lambda device: stop_flags(device, lagged=True))
    lagged = model.generate(batch, 20, decoding="eager", logits_processor=counted("lagged"))
    assert_same_answers(lagged, immediate)
    assert all(len(result.token_ids) < 19 for result in immediate), "the answers must stop before the limit"
    assert calls["lagged"] == calls["immediate"] + 1
    flags = stop_flags(torch.device("cpu"), lagged=True)
    assert [flags(torch.tensor(v)) for v in ([False, True], [True, True], [True, True])] == [False, False, True]


class EndRowAt(LogitsProcessor):
    """Row r of a batch chooses freely until step ``steps[r]``, then the end of turn."""

    def __init__(self, steps: list[int], end_id: int) -> None:
        self.steps, self.end_id, self.prompt_length = steps, end_id, None

    def __call__(self, input_ids, scores):
        self.prompt_length = self.prompt_length or input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        for row, end in enumerate(self.steps):
            if step >= end:
                scores[row] = -1e9
                scores[row, self.end_id] = 0
        return scores


def test_lagged_stop_check_with_rows_that_stop_at_different_steps(tiny_vlm_dir, photos, monkeypatch):
    """The lagged check ends a batch one step after its last row stopped, and each row's answer
    (cut at its own first stop token) is the immediate check's."""
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny").eval()
    batch = left_padded_batch(model, photos)
    end_id = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    immediate = model.generate(batch, 12, decoding="eager", logits_processor=EndRowAt([2, 6], end_id))
    stop_flags = decoding.StopFlags
    monkeypatch.setattr(decoding, "StopFlags", lambda device: stop_flags(device, lagged=True))
    lagged = model.generate(batch, 12, decoding="eager", logits_processor=EndRowAt([2, 6], end_id))
    assert [len(result.token_ids) for result in immediate] == [2, 6]
    assert_same_answers(lagged, immediate)
