"""Chat-template conversations, their labels, and batch padding, on every Qwen-VL generation."""

import numpy as np
import pytest
import torch

from conftest import load_photo
from model.batch import collate, encode_sample
from model.conversation import IGNORE_INDEX, build_messages, encode_conversation, template_markers
from model.processor import load_processor
from model.sam import SamTransform

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TURNS = [("Where is the dog?", "It is [SEG]."), ("And the grass and the sky?", "Sure, [SEG] and [SEG].")]


@pytest.fixture(scope="module")
def dog():
    return load_photo("dog.jpg")


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_assistant_replies(tiny_vlm_dir, family, dog):
    processor = load_processor(tiny_vlm_dir(family), family)
    sample = encode_conversation(processor, dog, TURNS)
    ids, labels = sample["input_ids"], sample["labels"]
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Rebuild the expected labels independently: tokenise the rendered conversation piece by piece.
    text = processor.apply_chat_template(build_messages(TURNS), tokenize=False)
    expected_text = "".join(answer + "<|im_end|>" for _, answer in TURNS)
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == expected_text
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # Two contiguous spans, each ending on the turn-end token, and nothing of the prompt or image.
    spans = np.split(np.array(supervised), np.where(np.diff(supervised) != 1)[0] + 1)
    assert len(spans) == 2 and all(ids[span[-1]] == end for span in spans)
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_token).sum() > 0 and (labels[ids == image_token] == IGNORE_INDEX).all()
    # The processor's outputs are passed through whole.
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(sample)
    assert "<|im_start|>assistant" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_open_last_turn_gets_the_generation_prompt_and_no_labels(tiny_vlm_dir, family, dog):
    processor = load_processor(tiny_vlm_dir(family), family)
    sample = encode_conversation(processor, dog, [("Where is the dog?", None)])
    markers = template_markers(processor)
    assert tuple(sample["input_ids"][-len(markers.reply_start):].tolist()) == markers.reply_start
    assert (sample["labels"] == IGNORE_INDEX).all()


def test_collate_pads_right_for_training_and_left_for_generation(tiny_vlm_dir, dog):
    processor = load_processor(tiny_vlm_dir("qwen2_5_vl"), "qwen2_5_vl")
    transform = SamTransform(256)
    mask = np.zeros(dog.shape[:2], np.uint8)
    long = encode_sample(processor, transform, dog, TURNS, [mask, mask, mask])
    short = encode_sample(processor, transform, dog[:200], [("Dog?", "[SEG].")], [mask[:200]])
    pad = processor.tokenizer.pad_token_id
    assert len(long["conversations"]) == len(short["conversations"]) == 1  # multi_turn: one conversation
    long_tokens, short_tokens = long["conversations"][0], short["conversations"][0]
    for side in ("right", "left"):
        batch = collate([long, short], pad, side)
        length = len(long_tokens["input_ids"])
        n_pad = length - len(short_tokens["input_ids"])
        assert batch["input_ids"].shape == (2, length) and n_pad > 0
        padded = slice(length - n_pad, length) if side == "right" else slice(0, n_pad)
        kept = slice(0, length - n_pad) if side == "right" else slice(n_pad, length)
        assert (batch["input_ids"][1, padded] == pad).all()
        assert (batch["attention_mask"][1, padded] == 0).all() and (batch["attention_mask"][1, kept] == 1).all()
        assert (batch["labels"][1, padded] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][1, kept], short_tokens["input_ids"])
        assert torch.equal(batch["labels"][1, kept], short_tokens["labels"])
        assert batch["pixel_values"].shape[0] == long["pixel_values"].shape[0] + short["pixel_values"].shape[0]
        assert [m.shape[0] for m in batch["masks"]] == [3, 1] and batch["image_index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="padding_side"):
        collate([long], pad, "middle")


@pytest.mark.parametrize("family", FAMILIES)
def test_single_turn_mode_asks_each_question_as_its_own_conversation(tiny_vlm_dir, family, dog):
    processor = load_processor(tiny_vlm_dir(family), family)
    tokenizer = processor.tokenizer
    mask = np.zeros(dog.shape[:2], np.uint8)
    turns = [*TURNS, ("How many dogs?", "One.")]
    sample = encode_sample(processor, SamTransform(256), dog, turns, [mask, mask, mask], conversation_mode="single_turn")
    assert len(sample["conversations"]) == 3 and sample["masks"].shape[0] == 3
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    alone = [encode_conversation(processor, dog, [turn]) for turn in turns]
    for (question, answer), conversation, reference in zip(turns, sample["conversations"], alone):
        ids, labels = conversation["input_ids"], conversation["labels"]
        text = tokenizer.decode(ids)
        # One question (this one), its image, and only its answer supervised.
        assert text.count("<|im_start|>user") == 1 and question in text
        assert all(other not in text for other, _ in turns if other != question)
        assert (ids == image_token).sum() == (reference["input_ids"] == image_token).sum() > 0
        assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == answer + "<|im_end|>"
        for key in conversation:
            assert torch.equal(conversation[key], reference[key]), key
    # The image fields once, as in a one-conversation sample.
    assert torch.equal(sample["pixel_values"], alone[0]["pixel_values"])
    assert torch.equal(sample["image_grid_thw"], alone[0]["image_grid_thw"])
    batch = collate([sample, encode_sample(processor, SamTransform(256), dog[:200], [("Dog?", "[SEG].")], [mask[:200]])],
                    tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["image_index"].tolist() == [0, 0, 0, 1]
    assert batch["image_grid_thw"].shape[0] == 2 and batch["sam_pixel_values"].shape[0] == 2
    assert [m.shape[0] for m in batch["masks"]] == [3, 1] and len(batch["extra"]) == 2
    with pytest.raises(ValueError, match="conversation_mode"):
        encode_sample(processor, SamTransform(256), dog, turns, [mask] * 3, conversation_mode="several")


def test_a_sample_processes_its_image_once_however_many_conversations(tiny_vlm_dir, dog, monkeypatch):
    processor = load_processor(tiny_vlm_dir("qwen2_5_vl"), "qwen2_5_vl")
    image_processor = processor.image_processor
    calls = []
    real_call = type(image_processor).__call__
    monkeypatch.setattr(type(image_processor), "__call__", lambda self, *a, **k: (calls.append(1), real_call(self, *a, **k))[1])
    turns = [*TURNS, ("How many dogs?", "One.")]
    masks = [np.zeros(dog.shape[:2], np.uint8)] * 3
    sample = encode_sample(processor, SamTransform(256), dog, turns, masks, conversation_mode="single_turn")
    assert len(sample["conversations"]) == 3 and len(calls) == 1
    assert processor.image_processor is image_processor  # the caller's processor is untouched
    encode_conversation(processor, dog, TURNS)
    assert len(calls) == 2


def test_masks_must_match_the_image(tiny_vlm_dir, dog):
    processor = load_processor(tiny_vlm_dir("qwen2_5_vl"), "qwen2_5_vl")
    with pytest.raises(ValueError, match="mask 0 has shape"):
        encode_sample(processor, SamTransform(256), dog, [("Dog?", "[SEG].")], [np.zeros((5, 5), np.uint8)])


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_three_pixels_high_is_read_channels_last(tiny_vlm_dir, family):
    """HxWx3 with H == 3 looks channels-first to transformers' guess: the grid must be (h, w)."""
    processor = load_processor(tiny_vlm_dir(family), family)
    tall = encode_conversation(processor, np.zeros((300, 3, 3), np.uint8), TURNS[:1])["image_grid_thw"][0]
    wide = encode_conversation(processor, np.zeros((3, 300, 3), np.uint8), TURNS[:1])["image_grid_thw"][0]
    assert tall[1] > tall[2] and wide[1] < wide[2] and tall[1:].tolist() == wide[1:].flip(0).tolist()


def test_a_template_whose_replies_cannot_be_found_is_refused(tiny_vlm_dir, dog):
    """A "Thinking" template opens each reply with a <think> block its generation prompt does not
    end like: no reply would get labels (a NaN loss, no [SEG] to train), so it is an error."""
    processor = load_processor(tiny_vlm_dir("qwen3_vl"), "qwen3_vl")
    # As Qwen3-VL-Thinking's: the generation prompt opens a <think> block, and only the last reply
    # keeps its (empty) one; earlier replies are rendered without.
    template = processor.chat_template.replace(
        "<|im_start|>{{ message['role'] }}\n",
        "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' and loop.last %}"
        "<think>\n\n</think>\n\n{% endif %}",
    ).replace("{% if add_generation_prompt %}<|im_start|>assistant\n", "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n")
    assert template.count("<think>") == 2, "the tiny template changed: update this test"
    processor.chat_template = processor.tokenizer.chat_template = template
    with pytest.raises(ValueError, match="replies could not be found: 2 answers, 1 labelled"):
        encode_conversation(processor, dog, TURNS)
