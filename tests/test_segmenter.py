"""The segmenter end to end on tiny random models saved as real Hugging Face directories."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import REPO, load_photo
from model.losses import mask_bce_loss, mask_dice_loss
from model.segmenter import ReasonSegmenter
from model.vlm import LANGUAGE_MODEL_LINEARS, LoraSettings, ensure_seg_token, is_hub_id, load_vlm, vlm_family
from utils.masks import mask_to_box

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


class ForcedAnswer(LogitsProcessor):
    """Makes greedy decoding produce a scripted answer, whatever the random weights say."""

    def __init__(self, token_ids: list[int], prompt_length: int):
        self.token_ids = token_ids
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = self.token_ids[min(step, len(self.token_ids) - 1)]
        scores = torch.full_like(scores, -1e9)
        scores[:, forced] = 0
        return scores


def forced(model, answer: str, prompt_length: int) -> LogitsProcessorList:
    tokenizer = model.processor.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return LogitsProcessorList([ForcedAnswer(ids, prompt_length)])


def rectangle_mask(shape, box, ignore_rows=0):
    mask = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    mask[:ignore_rows] = 255
    return mask


@pytest.fixture
def lora_model(tiny_vlm_dir):
    torch.manual_seed(0)
    return ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", lora=LoraSettings())


def teacher_forced(model, image, prompt: str, token_ids: list[int]) -> tuple:
    """The training forward over one unpadded request and the answer ``token_ids``:
    (its batch, the VLM output, the [n, H] states standing for the answer's [SEG]s)."""
    batch = model.collate([model.prepare(image, [(prompt, None)])], padding_side="left")
    prompt_length = batch["input_ids"].shape[1]
    tokens = torch.tensor(token_ids)[None]
    full = dict(batch)
    full["input_ids"] = torch.cat([batch["input_ids"], tokens], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tokens)], dim=1)
    full["labels"] = torch.cat([torch.full((1, prompt_length), -100), tokens], dim=1)
    with torch.no_grad():
        output = model.teacher_forced(full)
    return full, output, output.seg_states[0]


def training_batch(model, image):
    mask = rectangle_mask(image.shape[:2], (200, 100, 500, 300), ignore_rows=10)
    first = model.prepare(
        image,
        [("Where is the dog?", "It is [SEG]."), ("And the grass?", "Sure, [SEG] and [SEG].")],
        [mask, mask, 1 - mask.clip(0, 1)],
    )
    second = model.prepare(image[:300, :450], [("How many dogs?", "One.")], [])
    return model.collate([first, second])


def test_forward_shapes_and_loss_parts(lora_model, dog):
    lora_model.train()
    batch = training_batch(lora_model, dog)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["sam_pixel_values"].shape == (2, 3, 256, 256)
    output = lora_model(batch)
    assert output.num_masks == 3
    assert [tuple(m.shape) for m in output.mask_logits] == [(3, *dog.shape[:2]), (0, 300, 450)]
    assert output.mask_logits[0].dtype == torch.float32
    for part in (output.ce_loss, output.bce_loss, output.dice_loss):
        assert part.ndim == 0 and torch.isfinite(part) and part > 0
    expected = output.ce_loss + 2.0 * output.bce_loss + 0.5 * output.dice_loss
    assert torch.allclose(output.loss, expected)
    assert not lora_model.sam.image_encoder.training and not lora_model.sam.prompt_encoder.training
    assert lora_model.sam.mask_decoder.training


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_parameters_are_exactly_the_intended_ones(lora_model):
    names = trainable_names(lora_model)
    assert names, "nothing is trainable"
    for name in names:
        assert (
            "lora_" in name
            or "trainable_tokens" in name
            or name.startswith("projection.")
            or (name.startswith("sam.mask_decoder.") and "iou_prediction_head" not in name)
        ), name
    assert not any("visual" in n for n in names)
    assert any("embed_tokens" in n and "trainable_tokens" in n for n in names)
    assert any("lm_head" in n and "trainable_tokens" in n for n in names)
    # The [SEG] rows, not the whole matrices.
    rows = [p for n, p in lora_model.named_parameters() if "trainable_tokens" in n and p.requires_grad]
    assert all(p.numel() == lora_model.config.hidden_size for p in rows)


@pytest.mark.parametrize("with_seg", [True, False])
def test_every_trainable_parameter_gets_a_gradient(lora_model, dog, with_seg):
    lora_model.train()
    if with_seg:
        batch = training_batch(lora_model, dog)
    else:
        batch = lora_model.collate([lora_model.prepare(dog, [("How many dogs?", "One.")], [])])
    lora_model.zero_grad(set_to_none=True)
    lora_model(batch).loss.backward()
    missing = [n for n, p in lora_model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    frozen_with_grad = [n for n, p in lora_model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    if with_seg:
        assert lora_model.projection.fc1.weight.grad.abs().sum() > 0


def test_seg_count_mismatch_is_a_clear_error(lora_model, dog):
    sample = lora_model.prepare(dog, [("Where?", "It is [SEG].")], [], image_path="x.jpg")
    with pytest.raises(ValueError, match=r"x\.jpg.*1 \[SEG\].*0 ground-truth"):
        lora_model(lora_model.collate([sample]))


def test_mask_losses_ignore_255_pixels():
    torch.manual_seed(0)
    target = torch.zeros(8, 8, dtype=torch.uint8)
    target[2:5, 2:5] = 1
    target[:, 6:] = 255
    logits = torch.randn(8, 8)
    changed = logits.clone()
    changed[:, 6:] = 50.0  # only ignored pixels change
    assert torch.allclose(mask_bce_loss(logits, target), mask_bce_loss(changed, target))
    assert torch.allclose(mask_dice_loss(logits, target), mask_dice_loss(changed, target))
    # A perfect prediction scores (nearly) zero on both.
    perfect = torch.where(target == 1, 20.0, -20.0)
    assert mask_bce_loss(perfect, target) < 1e-6 and mask_dice_loss(perfect, target) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seg_state, answer", [
    ("seg_token", "Sure, [SEG] and [SEG]."),
    # The first [SEG] is the first answer token: the prompt's last state stands for it.
    ("preceding_token", "[SEG] and [SEG]."),
])
def test_generation_seg_states_equal_teacher_forced_states(tiny_vlm_dir, family, dog, seg_state, answer):
    """The one [SEG] convention (config.seg_state): KV-cache generation gives the teacher-forced
    forward's states, and they are the final hidden states at the [SEG] positions plus the offset."""
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir(family), "tiny", lora=LoraSettings()).eval()
    model.config.seg_state = seg_state
    sample = model.prepare(dog, [("Where is the dog?", None)])
    batch = model.collate([sample], padding_side="left")
    prompt_length = batch["input_ids"].shape[1]
    [result] = model.generate(batch, max_new_tokens=16, logits_processor=forced(model, answer, prompt_length))
    assert result.text == answer
    assert len(result.masks) == 2 and result.seg_states.shape == (2, model.config.hidden_size)
    # Teacher-forced pass over exactly the generated sequence.
    end_of_turn = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    full, output, states = teacher_forced(model, dog, "Where is the dog?", result.token_ids + [end_of_turn])
    torch.testing.assert_close(result.seg_states, states, rtol=1e-4, atol=1e-4)
    seg_positions = (full["input_ids"][0] == model.seg_token_id).nonzero()[:, 0]
    expected = output.hidden[0, seg_positions + (-1 if seg_state == "preceding_token" else 0)]
    torch.testing.assert_close(states, expected)
    assert not torch.allclose(output.hidden[0, seg_positions], output.hidden[0, seg_positions - 1])


def test_seg_produced_at_the_token_limit_still_gets_its_state(lora_model, dog):
    lora_model.eval()
    batch = lora_model.collate([lora_model.prepare(dog, [("Where?", None)])], padding_side="left")
    script = forced(lora_model, "It is [SEG]", batch["input_ids"].shape[1])
    n_tokens = len(lora_model.processor.tokenizer("It is [SEG]", add_special_tokens=False)["input_ids"])
    [result] = lora_model.generate(batch, max_new_tokens=n_tokens, logits_processor=script)
    assert result.text == "It is [SEG]" and len(result.masks) == 1


def test_batched_left_padded_generation_matches_single(lora_model, dog):
    lora_model.eval()
    truck = load_photo("truck.jpg")
    images, prompts = [dog, truck], ["Where is the dog?", "Find the truck wheel in this picture please."]
    answer = "It is [SEG]."
    batch = lora_model.collate([lora_model.prepare(i, [(p, None)]) for i, p in zip(images, prompts)], "left")
    together = lora_model.generate(batch, 8, logits_processor=forced(lora_model, answer, batch["input_ids"].shape[1]))
    for image, prompt, joint in zip(images, prompts, together):
        single_batch = lora_model.collate([lora_model.prepare(image, [(prompt, None)])], "left")
        script = forced(lora_model, answer, single_batch["input_ids"].shape[1])
        [alone] = lora_model.generate(single_batch, 8, logits_processor=script)
        assert joint.text == alone.text == answer
        torch.testing.assert_close(joint.seg_states, alone.seg_states, rtol=1e-4, atol=1e-4)
        assert joint.masks[0].shape == image.shape[:2]


def test_beam_search_gives_each_row_the_states_of_its_own_answer(lora_model, dog):
    """Beam search reorders its hypotheses: each request's [SEG] states are those of its answer."""
    lora_model.eval()
    images, prompts = [dog, load_photo("truck.jpg")], ["Where is the dog?", "Find the truck wheel in this picture please."]
    batch = lora_model.collate([lora_model.prepare(i, [(p, None)]) for i, p in zip(images, prompts)], "left")
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    script = forced(lora_model, "Sure, [SEG] and [SEG].", batch["input_ids"].shape[1])
    results = lora_model.generate(batch, 12, num_beams=3, logits_processor=script)
    for image, prompt, result in zip(images, prompts, results):
        assert result.text == "Sure, [SEG] and [SEG]." and len(result.masks) == 2
        _, _, states = teacher_forced(lora_model, image, prompt, result.token_ids)
        torch.testing.assert_close(result.seg_states, states, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        lora_model.generate(batch, 12, num_beams=2, num_return_sequences=2)


def test_sampling_takes_generate_options_and_its_states_match_its_answer(lora_model, dog):
    lora_model.eval()
    tokenizer = lora_model.processor.tokenizer
    [word] = tokenizer(" and", add_special_tokens=False)["input_ids"]
    batch = lora_model.collate([lora_model.prepare(dog, [("Where is the dog?", None)])], "left")
    # Sampling chooses freely between " and" and [SEG] for 8 tokens, then ends the turn.
    choices = [[word, lora_model.seg_token_id]] * 8 + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    script = LogitsProcessorList([ForcedAnswer(choices, batch["input_ids"].shape[1])])
    answers = []
    for _ in range(2):
        torch.manual_seed(3)
        [result] = lora_model.generate(batch, 12, do_sample=True, pad_token_id=tokenizer.pad_token_id, logits_processor=script)
        answers.append(result.token_ids)
    assert answers[0] == answers[1], "the same seed must sample the same answer"
    assert set(result.token_ids) == {word, lora_model.seg_token_id}, result.text
    _, _, states = teacher_forced(lora_model, dog, "Where is the dog?", result.token_ids)
    assert len(result.masks) == len(states) == result.token_ids.count(lora_model.seg_token_id)
    torch.testing.assert_close(result.seg_states, states, rtol=1e-4, atol=1e-4)


def test_generate_refuses_a_right_padded_batch(lora_model, dog):
    prompts = ["Where?", "Find the truck wheel in this picture please."]
    batch = lora_model.collate([lora_model.prepare(dog, [(p, None)]) for p in prompts])  # right padding
    with pytest.raises(ValueError, match=r'collate\(\.\.\., padding_side="left"\)'):
        lora_model.generate(batch, 4, decoding="eager")


def test_prediction_boxes_come_from_masks(lora_model, dog):
    lora_model.eval()
    batch = lora_model.collate([lora_model.prepare(dog, [("Where?", None)])], padding_side="left")
    [result] = lora_model.generate(batch, 8, logits_processor=forced(lora_model, "[SEG]", batch["input_ids"].shape[1]))
    assert result.masks[0].dtype == bool
    assert result.boxes == [mask_to_box(result.masks[0])]


def test_no_seg_answer_gives_no_masks(lora_model, dog):
    lora_model.eval()
    batch = lora_model.collate([lora_model.prepare(dog, [("How many?", None)])], padding_side="left")
    [result] = lora_model.generate(batch, 8, logits_processor=forced(lora_model, "One.", batch["input_ids"].shape[1]))
    assert result.text == "One." and result.masks == [] and result.boxes == []


@pytest.mark.parametrize("with_lora", [True, False])
def test_save_and_reload_reproduce_the_masks(tiny_vlm_dir, tmp_path, dog, with_lora):
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", lora=LoraSettings() if with_lora else None)
    # Make the trainable parts non-trivial so that a reload that drops them would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = ReasonSegmenter.from_pretrained(tmp_path / "ckpt").eval()
    assert (tmp_path / "ckpt" / ("adapter" if with_lora else "vlm")).is_dir()
    batch = model.collate([model.prepare(dog, [("Where is the dog?", None)])], padding_side="left")
    script = forced(model, "It is [SEG] and [SEG].", batch["input_ids"].shape[1])
    [before] = model.generate(batch, 12, logits_processor=script)
    [after] = reloaded.generate(batch, 12, logits_processor=script)
    torch.testing.assert_close(before.seg_states, after.seg_states)
    for a, b in zip(before.masks, after.masks):
        assert np.array_equal(a, b)


def hub_cache(root, repo_id: str, model_dir) -> None:
    """Put ``model_dir`` into the hub cache ``root`` as a download of ``repo_id`` is laid out there:
    models--owner--name/snapshots/<commit>/ and refs/main naming that commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_lora_checkpoint_of_a_hub_model_loads_from_the_hub_cache(tiny_vlm_dir, tmp_path, monkeypatch, dog):
    """train_ddp.py --version owner/name trains on a model of the hub: its checkpoint records the
    hub id as its base model and loads again (resuming, test.py, transform_weight.py) from the
    local hub cache, offline (HF_HUB_OFFLINE=1, see conftest), with or without base_model."""
    import huggingface_hub.constants

    hub_cache(tmp_path / "hub", "owner/tiny-vl", tiny_vlm_dir("qwen2_5_vl"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each call
    monkeypatch.chdir(tmp_path)  # no ./owner/tiny-vl: the id names no local directory
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components("owner/tiny-vl", "tiny", lora=LoraSettings()).eval()
    with torch.no_grad():  # trained LoRA and [SEG] rows, which a load that dropped them would show
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["vlm_path"] == "owner/tiny-vl"
    batch = model.collate([model.prepare(dog, [("Where is the dog?", None)])], padding_side="left")
    script = forced(model, "It is [SEG].", batch["input_ids"].shape[1])
    [expected] = model.generate(batch, 8, logits_processor=script)
    for base_model in (None, "owner/tiny-vl"):
        reloaded = ReasonSegmenter.from_pretrained(tmp_path / "ckpt", base_model=base_model).eval()
        assert reloaded.config.vlm_path == "owner/tiny-vl"  # what its next checkpoint records
        [result] = reloaded.generate(batch, 8, logits_processor=script)
        torch.testing.assert_close(result.seg_states, expected.seg_states)
    with pytest.raises(FileNotFoundError, match="base model owner/absent, which could not be found.*hf download"):
        ReasonSegmenter.from_pretrained(tmp_path / "ckpt", base_model="owner/absent")


def test_a_checkpoint_of_a_model_given_by_a_relative_path_loads_from_anywhere(tiny_vlm_dir, tmp_path, monkeypatch):
    """train_ddp.py --version weights/qwen (relative, and shaped like a hub id) records the base
    model's absolute path: the checkpoint loads from another working directory (test.py, a resume),
    never taking the path for a hub id."""
    shutil.copytree(tiny_vlm_dir("qwen2_5_vl"), tmp_path / "weights" / "qwen")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components("weights/qwen", "tiny", lora=LoraSettings())
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["vlm_path"] == str(tmp_path / "weights" / "qwen")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reloaded = ReasonSegmenter.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.adapter_path and reloaded.config.vlm_family == "qwen2_5_vl"


def test_a_missing_vlm_is_a_clear_error(tiny_segmenter_dir, tmp_path):
    """A base model path that names nothing, and a full-VLM directory without its vlm/."""
    lora_checkpoint = tmp_path / "lora"
    lora_checkpoint.mkdir()
    config = json.loads((tiny_segmenter_dir() / "config.json").read_text())
    (lora_checkpoint / "config.json").write_text(json.dumps({**config, "adapter_path": "adapter"}))
    for missing in ("./owner/name", str(tmp_path / "moved")):  # paths, not hub ids
        with pytest.raises(FileNotFoundError, match=f"base model {missing}, which does not exist .*base_model"):
            ReasonSegmenter.from_pretrained(lora_checkpoint, base_model=missing)
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(tiny_segmenter_dir() / "config.json", full)
    with pytest.raises(FileNotFoundError, match="holds no vlm/ .*the directory is incomplete"):
        ReasonSegmenter.from_pretrained(full)


def test_only_an_owner_and_name_that_is_no_local_path_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct")
    (tmp_path / "runs" / "base").mkdir(parents=True)
    assert not is_hub_id("runs/base")  # a directory here
    for path in ("./owner/name", "/owner", "owner/name/sub", "name", ".owner/name"):
        assert not is_hub_id(path), path


@pytest.mark.parametrize("family", FAMILIES)
def test_each_generation_trains_and_predicts_from_a_saved_directory(tiny_segmenter_dir, family, dog):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir(family))
    assert model.config.vlm_family == family
    model.train()
    batch = model.collate([model.prepare(dog, [("Segment the dog.", "[SEG].")], [rectangle_mask(dog.shape[:2], (1, 1, 50, 50))])])
    output = model(batch)
    output.loss.backward()
    assert model.projection.fc2.weight.grad is not None
    model.eval()
    [result] = model.predict([dog], ["Where is the dog?"], max_new_tokens=6)
    assert isinstance(result.text, str) and len(result.token_ids) <= 6


def test_seg_token_is_special_and_matrices_never_shrink(tiny_vlm_dir):
    from model.processor import load_processor

    directory = tiny_vlm_dir("qwen2_5_vl")
    processor = load_processor(directory, "qwen2_5_vl")
    vlm = load_vlm(directory)
    rows = vlm.get_input_embeddings().weight.shape[0]
    assert rows > len(processor.tokenizer)  # Qwen-style spare rows
    seg_id = ensure_seg_token(vlm, processor.tokenizer)
    assert vlm.get_input_embeddings().weight.shape[0] == rows
    assert processor.tokenizer.convert_ids_to_tokens(seg_id) == "[SEG]"
    assert processor.tokenizer("a [SEG] b", add_special_tokens=False)["input_ids"].count(seg_id) == 1
    # A tokenizer that outgrows the matrix makes it grow, never shrink.
    processor.tokenizer.add_tokens([f"<extra_{i}>" for i in range(rows)])
    ensure_seg_token(vlm, processor.tokenizer)
    assert vlm.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) > rows


def test_lora_targets_are_configurable_and_stay_out_of_the_vision_tower(tiny_vlm_dir):
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"])
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", lora=settings)
    lora_names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_names and not any("visual" in n for n in lora_names)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora_names} == {"q_proj", "k_proj", "gate_proj", "down_proj"}
    assert all(p.shape[0] == 4 for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_all_linear_is_every_linear_layer_of_the_language_model(tiny_vlm_dir, family):
    """peft's "all-linear" as --lora_target_modules: the language model's seven, not the vision
    tower's MLP (same names in Qwen2.5-VL) nor lm_head."""
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    model = ReasonSegmenter.from_components(tiny_vlm_dir(family), "tiny", lora=settings)
    lora_names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora_names} == set(LANGUAGE_MODEL_LINEARS)
    layers = model.vlm.get_base_model().config.text_config.num_hidden_layers
    assert len(lora_names) == layers * len(LANGUAGE_MODEL_LINEARS)


def test_whole_language_model_option(tiny_vlm_dir):
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", train_language_model=True)
    names = trainable_names(model)
    assert any("language_model.layers.0.mlp" in n for n in names)
    assert not any("visual" in n for n in names)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="qwen2_5_vl.*qwen2_vl.*qwen3_vl"):
        vlm_family(tmp_path)


def test_no_torchvision_is_imported():
    code = (
        "import sys; from model.segmenter import ReasonSegmenter; from model.tiny import make_tiny_segmenter;"
        "assert 'torchvision' not in sys.modules, 'torchvision imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_bf16_model_decodes_masks(tiny_segmenter_dir, dog):
    """bf16 inference (the CUDA default): SAM's prompt encoder keeps float32, masks come out."""
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir(), dtype=torch.bfloat16).eval()
    assert model.projection.fc1.weight.dtype == torch.bfloat16
    assert model.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    batch = model.collate([model.prepare(dog, [("Where is the dog?", None)])], padding_side="left")
    assert batch["sam_pixel_values"].dtype == torch.uint8  # normalised in float32 on the device, then cast
    [result] = model.generate(batch, 8, logits_processor=forced(model, "It is [SEG].", batch["input_ids"].shape[1]))
    assert len(result.masks) == 1 and result.masks[0].shape == dog.shape[:2]


# --------------------------------------------------------------------------- single-turn conversations


def reason_seg_training_sample(tmp_path):
    """A ReasonSeg training sample with 3 queries (one target), from the on-disk format."""
    import data_fixtures as fx
    from utils.data.reason_seg import ReasonSegDataset

    fx.write_reason_seg(tmp_path)
    dataset = ReasonSegDataset(str(tmp_path), "train", explanatory_rate=0.0, text_only_rate=0.0)
    sample = dataset[0]
    assert len(sample.turns) == 3 and len(sample.masks) == 3 and not sample.dialogue
    return sample, ReasonSegDataset(str(tmp_path), "val", mode="val")[0]


def count_calls(module, counts, key, rows=lambda args: args[0].shape[0]):
    return module.register_forward_pre_hook(lambda _m, args: counts[key].append(rows(args)))


@pytest.mark.parametrize("family", FAMILIES)
def test_single_turn_training_forward_equals_separate_samples(tiny_vlm_dir, family, tmp_path):
    """Three questions about one image: three single-turn conversations in one sample, whose
    vision tower and SAM encoder run once per image, with the loss and gradients of the three
    conversations given as three separate samples (each with its own copy of the image)."""
    from model.batch import SampleEncoder, encode_sample
    from model.image_cache import find_vision_tower
    from utils.data.sample import SEG_TOKEN

    raw, other = reason_seg_training_sample(tmp_path)
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir(family), "tiny", lora=LoraSettings(dropout=0.0)).train()
    encoder = SampleEncoder(model.processor, model.sam_transform, conversation_mode="single_turn")
    sample = encoder(raw)
    tokenizer = model.processor.tokenizer
    assert len(sample["conversations"]) == 3
    for (question, _), conversation in zip(raw.turns, sample["conversations"]):
        text = tokenizer.decode(conversation["input_ids"])
        assert text.count(SEG_TOKEN) == 1 and text.count("<|im_start|>user") == 1 and question in text

    # Once per image: the vision tower's patch embedding and SAM's encoder see each image once.
    shared = model.collate([sample, encoder(other)])
    assert shared["input_ids"].shape[0] == 4 and shared["image_index"].tolist() == [0, 0, 0, 1]
    visual = find_vision_tower(model.vlm)
    counts = {"vision_calls": [], "patches": [], "sam": []}
    handles = [count_calls(visual, counts, "vision_calls", rows=lambda args: 1),
               count_calls(visual.patch_embed, counts, "patches"), count_calls(model.sam.image_encoder, counts, "sam")]
    try:
        output = model(shared)
    finally:
        for handle in handles:
            handle.remove()
    assert counts["vision_calls"] == [1] and counts["patches"] == [shared["pixel_values"].shape[0]]
    assert counts["sam"] == [2] and output.num_masks == 4
    assert [tuple(m.shape[:1]) for m in output.mask_logits] == [(3,), (1,)]

    # The same three conversations as three samples, each carrying the image.
    separate = [
        encode_sample(model.processor, model.sam_transform, raw.image, [turn], [mask])
        for turn, mask in zip(raw.turns, raw.masks)
    ]

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        result = model(batch)
        result.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return result, grads

    one, one_grads = loss_and_grads(model.collate([sample]))
    three, three_grads = loss_and_grads(model.collate(separate))
    assert model.collate(separate)["image_index"].tolist() == [0, 1, 2]
    for part in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        torch.testing.assert_close(getattr(one, part), getattr(three, part), rtol=0, atol=1e-5)
    assert one.num_masks == three.num_masks == 3
    torch.testing.assert_close(one.mask_logits[0], torch.cat(three.mask_logits), rtol=0, atol=1e-5)
    assert one_grads.keys() == three_grads.keys() and len(one_grads) == len(trainable_names(model))
    for name in one_grads:
        torch.testing.assert_close(one_grads[name], three_grads[name], rtol=0, atol=1e-5, msg=name)


def full_logits_seg_states(model, batch):
    """The training forward before the LM head was restricted to labelled positions (reference)."""
    from model.batch import row_images
    from model.shared_images import shared_images
    from model.segmenter import TeacherForcedOutput

    with model.capture_final_states() as captured, shared_images(model.vlm, batch) as inputs:
        output = model.vlm(**inputs, labels=batch["labels"])
    hidden = captured[-1]
    seg_positions = batch["labels"] == model.seg_token_id
    per_sample = [[] for _ in batch["masks"]]
    for row, sample in enumerate(row_images(batch)):
        per_sample[sample].append(hidden[row][seg_positions[row]])
    states = [torch.cat(parts) if parts else hidden.new_zeros((0, hidden.shape[-1])) for parts in per_sample]
    return TeacherForcedOutput(output.loss, hidden, states)


@pytest.mark.parametrize("train_language_model", [False, True], ids=["lora", "language_model"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_only_at_labelled_positions_keeps_loss_and_gradients(tiny_vlm_dir, family, train_language_model, tmp_path, monkeypatch):
    """The training forward computes logits only where the next token is labelled, with the loss
    and every trainable gradient of the full-logits forward (right-padded rows, several
    conversations per image, LoRA with trainable [SEG] rows or the whole language model)."""
    from model.batch import SampleEncoder

    raw, _ = reason_seg_training_sample(tmp_path)
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(
        tiny_vlm_dir(family), "tiny", lora=LoraSettings(dropout=0.0), train_language_model=train_language_model
    ).train()
    assert train_language_model or any("lm_head" in n and "trainable_tokens" in n for n in trainable_names(model))
    dog = load_photo("dog.jpg")
    mask = rectangle_mask(dog.shape[:2], (200, 100, 500, 300))
    other = model.prepare(dog, [("Where is the dog?", "It is [SEG]."), ("And the grass?", "Sure, [SEG] and [SEG].")],
                          [mask, mask, 1 - mask], conversation_mode="single_turn")
    encoder = SampleEncoder(model.processor, model.sam_transform, conversation_mode="single_turn")
    batch = model.collate([encoder(raw), other])
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1]
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and (batch["attention_mask"][:, 0] == 1).all()  # right padding

    head = model.vlm.get_output_embeddings()
    head_rows = []
    handle = head.register_forward_hook(lambda _m, _i, out: head_rows.append(out.shape[:-1].numel()))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        result = model(batch)
        result.loss.backward()
        return result, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        kept, kept_grads = loss_and_grads()
        with monkeypatch.context() as patch:
            patch.setattr(ReasonSegmenter, "teacher_forced", full_logits_seg_states)
            full, full_grads = loss_and_grads()
    finally:
        handle.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert head_rows == [labelled, batch["labels"].numel()]  # the head ran on n rows, then on all R x T
    for part in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        torch.testing.assert_close(getattr(kept, part), getattr(full, part), rtol=1e-5, atol=0)
    assert kept_grads.keys() == full_grads.keys() and len(kept_grads) == len(trainable_names(model))
    for name, grad in kept_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-5 * full_grads[name].abs().max().item(), msg=name)
    if not train_language_model:
        seg_row = [g for n, g in kept_grads.items() if "lm_head" in n and "trainable_tokens" in n]
        assert seg_row and seg_row[0].abs().sum() > 0


def test_dialogues_stay_one_conversation_and_multi_turn_is_an_option(lora_model, tmp_path):
    from model.batch import SampleEncoder
    from utils.data.sample import RawSample

    raw, _ = reason_seg_training_sample(tmp_path)
    multi = SampleEncoder(lora_model.processor, lora_model.sam_transform, conversation_mode="multi_turn")(raw)
    assert len(multi["conversations"]) == 1
    assert lora_model.processor.tokenizer.decode(multi["conversations"][0]["input_ids"]).count("<|im_start|>user") == 3
    dialogue = RawSample(raw.image, "x.jpg", "vqa", [("How many?", "Two."), ("And now?", "Three.")], [], ["a", "b"],
                         {"no_target": [False, False]}, dialogue=True)
    single = SampleEncoder(lora_model.processor, lora_model.sam_transform, conversation_mode="single_turn")
    assert len(single(dialogue)["conversations"]) == 1
    lora_model.train()
    output = lora_model(lora_model.collate([multi, single(raw)]))
    assert output.num_masks == 6 and torch.isfinite(output.loss)


def test_side_stream_runs_work_at_once_off_cuda():
    """model.side_stream on a CPU: the work runs when started (no stream to run it beside), and
    its result is handed over unchanged. (On CUDA it runs on a second stream: the GPU benchmark
    checks the masks of that path against eager decoding and the published way.)"""
    from model.side_stream import SideStream

    calls = []
    ready = SideStream().start(lambda: calls.append("ran") or torch.arange(3), torch.device("cpu"))
    assert calls == ["ran"]
    assert torch.equal(ready(), torch.arange(3))
