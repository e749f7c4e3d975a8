"""config.seg_state: which hidden state stands for a [SEG] (its own, or the one that predicts it),
one choice per model, recorded in config.json and used alike by training, every decoding mode and
the benchmark's published (second-pass) generation."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from model.config import SegmenterConfig
from model.merge import merge_checkpoint
from model.segmenter import ReasonSegmenter, state_positions
from tools.bench.common import ScriptedAnswer, request_batch, scene
from tools.bench.generation import published_generate


def test_config_default_round_trip_and_old_files(tmp_path: Path) -> None:
    assert SegmenterConfig("qwen2_5_vl", "tiny", 64, 32).seg_state == "seg_token"
    SegmenterConfig("qwen2_5_vl", "tiny", 64, 32, seg_state="preceding_token").save_pretrained(tmp_path / "new")
    assert SegmenterConfig.from_pretrained(tmp_path / "new").seg_state == "preceding_token"
    old = json.loads((tmp_path / "new" / "config.json").read_text())
    del old["seg_state"]  # a config.json written before the option existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert SegmenterConfig.from_pretrained(tmp_path / "old").seg_state == "seg_token"
    with pytest.raises(ValueError, match="seg_state must be one of seg_token, preceding_token"):
        SegmenterConfig("qwen2_5_vl", "tiny", 64, 32, seg_state="next_token")


def test_state_positions_moves_each_seg_to_the_token_before() -> None:
    seg = torch.tensor([[False, False, True, False, True], [False, True, False, False, False]])
    assert torch.equal(state_positions(seg, 0), seg)
    assert state_positions(seg, -1).nonzero().tolist() == [[0, 1], [0, 3], [1, 0]]
    with pytest.raises(ValueError, match="not 1 later"):
        state_positions(seg, 1)


def test_the_flag_is_recorded_merged_and_kept_by_fine_tuning(tiny_vlm_dir, tmp_path: Path) -> None:
    from model.sam import build_sam
    from utils.train_args import build_parser
    from utils.trainer import build_model

    parser = build_parser()
    assert parser.parse_args([]).seg_state is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--seg_state", "next_token"])
    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), tmp_path / "sam_tiny.pth")
    new = ["--version", str(tiny_vlm_dir("qwen2_5_vl")), "--vision_pretrained", str(tmp_path / "sam_tiny.pth"),
           "--vision_model", "tiny", "--train_language_model"]  # as the demo: a full VLM in the checkpoint
    assert build_model(parser.parse_args(new), None, torch.float32, "cpu").config.seg_state == "seg_token"
    model = build_model(parser.parse_args([*new, "--seg_state", "preceding_token"]), None, torch.float32, "cpu")
    assert model.config.seg_state == "preceding_token" and model.seg_state_offset == -1
    model.save_pretrained(tmp_path / "checkpoint")
    merged = merge_checkpoint(tmp_path / "checkpoint", tmp_path / "merged", dtype=torch.float32)  # transform_weight.py
    assert SegmenterConfig.from_pretrained(merged).seg_state == "preceding_token"
    # Fine-tuning a segmenter directory without the flag keeps the convention it was trained with.
    again = build_model(parser.parse_args(["--version", str(tmp_path / "checkpoint"), "--train_language_model"]), None, torch.float32, "cpu")
    assert again.config.seg_state == "preceding_token"
    switched = build_model(parser.parse_args(["--version", str(tmp_path / "checkpoint"), "--train_language_model",
                                             "--seg_state", "seg_token"]),
                           None, torch.float32, "cpu")
    assert switched.config.seg_state == "seg_token"


@pytest.fixture(scope="module")
def preceding_model(tiny_segmenter_dir):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    model.config.seg_state = "preceding_token"
    return model


def test_every_generation_path_reads_the_preceding_state(preceding_model) -> None:
    """The loop, transformers' generate and the published second pass agree, including for a
    [SEG] that is the first answer token (the prompt's last state stands for it)."""
    model = preceding_model
    image, _, _ = scene(0)
    batch = request_batch(model, [image], ["Where is the red circle?"])
    prompt_length = batch["input_ids"].shape[1]
    tokenizer = model.processor.tokenizer
    ids = tokenizer("[SEG] and the [SEG].", add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert ids[0] == model.seg_token_id

    def script():
        return LogitsProcessorList([ScriptedAnswer(ids, prompt_length)])

    eager = model.generate(batch, 16, decoding="eager", logits_processor=script())[0]
    reference = model.generate(batch, 16, decoding="transformers", logits_processor=script())[0]
    published = published_generate(model, batch, 16, logits_processor=script())[0]
    assert eager.token_ids == reference.token_ids == published.token_ids == ids[:-1]
    assert eager.seg_states.shape == (2, model.config.hidden_size)
    for other in (reference, published):
        torch.testing.assert_close(eager.seg_states, other.seg_states, rtol=1e-4, atol=1e-4)
    # Not the [SEG] tokens' own states: switching the convention changes the prompts SAM gets.
    model.config.seg_state = "seg_token"
    try:
        own = model.generate(batch, 16, decoding="eager", logits_processor=script())[0]
    finally:
        model.config.seg_state = "preceding_token"
    assert not torch.allclose(own.seg_states, eager.seg_states, atol=1e-3)
