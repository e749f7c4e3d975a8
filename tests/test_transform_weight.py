"""transform_weight.py: a training checkpoint merged into a standalone directory.

The "training checkpoint" is made without training: a tiny LoRA segmenter whose trainable
parameters (LoRA, [SEG] rows, projection, mask decoder) are perturbed so that a merge that lost
any of them would show, saved as the trainer saves (``include_sam=False``).
"""

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import DATA, REPO, load_photo
from model.loading import ModelLoadError, load_segmenter, resolve_checkpoint
from model.merge import MergeError, check_lora_overrides, merge_checkpoint
from model.processor import load_processor
from model.sam import build_sam
from model.segmenter import ReasonSegmenter
from model.tiny import save_tiny_vlm
from model.vlm import LoraSettings, parse_target_modules
from utils.checkpoint import best_checkpoint, checkpoint_name, latest_checkpoint, mark_best

LAST, FIRST = checkpoint_name(2), checkpoint_name(1)
from test_inference import run_entry, scripted

ANSWER = "It is [SEG] and [SEG]."
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # the checkpoint key (legacy Qwen layout)


def perturb(model, scale=0.05):
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)


@pytest.fixture(scope="module")
def run(tiny_vlm_dir, tmp_path_factory):
    """A run directory with two checkpoints and a 'latest' file; the model of the latest."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), root / "sam_tiny.pth")
    model = ReasonSegmenter.from_components(
        tiny_vlm_dir("qwen2_5_vl"), "tiny", sam_checkpoint=root / "sam_tiny.pth", lora=LoraSettings()
    )
    model.config.answer_style = "named"  # as build_model records --answer_style named
    for step in (1, 2):  # as the trainer writes them (utils/checkpoint.py)
        perturb(model)
        directory = root / "run" / checkpoint_name(step)
        model.save_pretrained(directory, include_sam=False)
        (directory / "trainer_state.json").write_text("{}")  # trainer files are ignored
        (directory / "optimizer.pt").write_bytes(b"ignored")
        (root / "run" / "latest").write_text(directory.name + "\n")
    return root, model.eval()


@pytest.fixture(scope="module")
def merged(run, tiny_vlm_dir):
    """transform_weight.py run as a user runs it; the base model and SAM file it reads are
    copies given with --base_model / --vision_pretrained, deleted afterwards (the output must
    not need them)."""
    root, _ = run
    base = shutil.copytree(tiny_vlm_dir("qwen2_5_vl"), root / "moved" / "base")
    sam = shutil.copy(root / "sam_tiny.pth", root / "moved" / "sam.pth")
    result = run_entry(
        ["transform_weight.py", "--ckpt", root / "run", "--out", root / "merged", "--precision", "fp32",
         "--base_model", base, "--vision_pretrained", sam, "--lora_r", "8", "--lora_alpha", "16"]
    )
    shutil.rmtree(root / "moved")
    return root / "merged", result


def test_merge_picks_the_latest_checkpoint_and_writes_a_standalone_directory(merged, run):
    out, result = merged
    assert result.returncode == 0, result.stderr
    assert f"using {run[0] / 'run' / LAST} (named by its 'latest' file)" in result.stderr
    assert "WARNING" not in result.stderr  # the restated LoRA flags match the checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.safetensors", "sam.safetensors", "vlm"]
    config = json.loads((out / "config.json").read_text())
    assert config["adapter_path"] is None and config["vlm_path"] == "vlm" and config["sam_checkpoint"] is None
    assert config["lora"] == {} and config["merged_from"]["lora"]["r"] == 8
    assert config["answer_style"] == "named"  # test.py words its answers as the model was trained
    weights = list((out / "vlm").glob("*.safetensors"))
    assert weights and not list((out / "vlm").glob("adapter*"))
    for file in weights:
        with safe_open(file, "pt") as f:
            leftovers = [k for k in f.keys() if "lora" in k or "base_layer" in k or "trainable_tokens" in k]
        assert leftovers == []
    processor = load_processor(out / "vlm", "qwen2_5_vl")
    seg_id = processor.tokenizer.convert_tokens_to_ids("[SEG]")
    assert processor.tokenizer("a [SEG] b", add_special_tokens=False)["input_ids"].count(seg_id) == 1


def test_merged_model_gives_the_unmerged_masks_and_text(merged, run):
    out, _ = merged
    unmerged = run[1]
    model = ReasonSegmenter.from_pretrained(out).eval()
    assert type(model.vlm).__module__.startswith("transformers.")
    dog = load_photo("dog.jpg")
    batch = model.collate([model.prepare(dog, [("Where is the dog?", None)])], padding_side="left")
    [before] = unmerged.generate(batch, 12, logits_processor=scripted(unmerged, ANSWER))
    [after] = model.generate(batch, 12, logits_processor=scripted(model, ANSWER))
    assert before.text == after.text == ANSWER
    torch.testing.assert_close(after.seg_states, before.seg_states, rtol=1e-4, atol=1e-5)
    for a, b in zip(before.masks, after.masks):
        assert np.mean(a != b) < 1e-4  # fp32 rounding may flip a pixel right at the threshold
    # Free generation follows the same tokens (the LoRA and the [SEG] rows are in the weights).
    [free_before] = unmerged.generate(batch, 10)
    [free_after] = model.generate(batch, 10)
    assert free_before.token_ids == free_after.token_ids


def test_merged_directory_runs_without_peft(merged, tmp_path):
    out, _ = merged
    block_peft = (
        "import sys; sys.modules['peft'] = None\n"
        "from model.segmenter import ReasonSegmenter\n"
        f"m = ReasonSegmenter.from_pretrained({str(out)!r})\n"
        "assert not type(m.vlm).__module__.startswith('peft')\n"
        f"m.save_pretrained({str(tmp_path / 'resaved')!r})\n"
        "import atexit; atexit.register(lambda: print('peft imported:', sys.modules.get('peft') is not None))"
    )
    result = run_entry(
        ["inference.py", "--version", out, "--image", DATA / "dog.jpg", "--prompt", "Where is the dog?",
         "--max_new_tokens", "6", "--vis_save_path", tmp_path / "vis"],
        wrapper=block_peft,
    )
    assert result.returncode == 0, result.stderr
    assert "answer: " in result.stdout and "peft imported: False" in result.stdout
    assert (tmp_path / "resaved" / "vlm").is_dir()


def test_lora_alpha_flag_overrides_the_scaling_with_a_warning(run, merged, tmp_path, caplog):
    root, _ = run
    with caplog.at_level("WARNING"):
        merge_checkpoint(root / "run" / LAST, tmp_path / "alpha32", dtype=torch.float32, lora_overrides={"alpha": 32})
    assert "--lora_alpha 32 differs from the checkpoint's 16" in caplog.text
    config = json.loads((tmp_path / "alpha32" / "config.json").read_text())
    assert config["merged_from"]["lora_overrides"] == {"alpha": 32}

    def q_proj(directory):
        with safe_open(next(directory.glob("*.safetensors")), "pt") as f:
            return f.get_tensor(Q_PROJ)

    base = q_proj(Path(json.loads((root / "run" / LAST / "config.json").read_text())["vlm_path"]))
    delta16 = q_proj(merged[0] / "vlm") - base
    delta32 = q_proj(tmp_path / "alpha32" / "vlm") - base
    assert delta16.abs().max() > 0
    torch.testing.assert_close(delta32, 2 * delta16, rtol=1e-4, atol=1e-6)


def test_lora_flags_that_cannot_apply_are_refused(caplog):
    saved = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert check_lora_overrides(saved, {"r": 8, "alpha": 16.0, "target_modules": ["v_proj", "q_proj"]}) == {}
    assert check_lora_overrides(saved, {"target_modules": parse_target_modules("q_proj, v_proj")}) == {}  # as typed
    with pytest.raises(MergeError, match="--lora_r 16 differs from the checkpoint's 8"):
        check_lora_overrides(saved, {"r": 16})
    with pytest.raises(MergeError, match="--lora_target_modules"):
        check_lora_overrides(saved, {"target_modules": ["q_proj", "k_proj"]})
    with caplog.at_level("WARNING"):
        assert check_lora_overrides(saved, {"dropout": 0.1}) == {}
    assert "no effect on a merge" in caplog.text


def test_choosing_a_checkpoint_of_a_run(run, tmp_path):
    """The tools pick the checkpoint the trainer would resume from (utils/checkpoint.py)."""
    root, _ = run
    run_dir = root / "run"
    assert resolve_checkpoint(run_dir / FIRST) == run_dir / FIRST
    assert resolve_checkpoint(run_dir) == run_dir / LAST  # its latest file
    copy = shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    (copy / "latest").unlink()
    for step in (9, 10):  # steps compare as numbers, not as names
        shutil.copytree(copy / FIRST, copy / f"checkpoint-{step}")
    assert resolve_checkpoint(copy) == latest_checkpoint(copy) == copy / "checkpoint-10"  # the highest step
    (copy / "latest").write_text(FIRST)
    assert resolve_checkpoint(copy) == latest_checkpoint(copy) == copy / FIRST
    with pytest.raises(ModelLoadError, match="no 'best'"):
        resolve_checkpoint(copy, pick="best")
    mark_best(copy, copy / LAST)  # the trainer's best file
    assert resolve_checkpoint(copy, pick="best") == best_checkpoint(copy) == copy / LAST
    (copy / "best").unlink()
    (copy / "best").symlink_to(copy / FIRST, target_is_directory=True)  # or a link
    assert resolve_checkpoint(copy, pick="best") == best_checkpoint(copy) == (copy / FIRST).resolve()
    (copy / "latest").write_text("checkpoint-8")
    with pytest.raises(ModelLoadError, match="checkpoint-8, which is not a segmenter checkpoint"):
        resolve_checkpoint(copy)


def test_clear_errors_for_what_cannot_be_merged(run, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")
    deepspeed = tmp_path / "ds"
    (deepspeed / "global_step100").mkdir(parents=True)
    (deepspeed / "global_step100" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="raw DeepSpeed ZeRO files"):
        resolve_checkpoint(deepspeed)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="pass --overwrite"):
        merge_checkpoint(run[0] / "run", tmp_path / "busy")
    with pytest.raises(MergeError, match="not a merged segmenter directory; refusing"):
        merge_checkpoint(run[0] / "run", tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").is_file()


def test_a_failed_merge_leaves_the_output_as_it_was(run, tmp_path, monkeypatch):
    """--overwrite replaces a merged model only by a whole new one: a refused flag, a base model
    that cannot load or a save that fails (a full disk) leave the old one, and no half-written
    directory; a training checkpoint or a file is never the output."""
    out = merge_checkpoint(run[0] / "run", tmp_path / "merged", dtype=torch.float32)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(MergeError, match="differs"):
        merge_checkpoint(run[0] / "run", out, overwrite=True, lora_overrides={"r": 4})
    with pytest.raises(MergeError, match="cannot load"):
        merge_checkpoint(run[0] / "run", out, overwrite=True, base_model=tmp_path / "nowhere")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReasonSegmenter, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoint(run[0] / "run", out, overwrite=True, dtype=torch.float32)
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoint(run[0] / "run", tmp_path / "fresh", dtype=torch.float32)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or half-written directory left
    monkeypatch.undo()
    with pytest.raises(MergeError, match="not a merged segmenter directory"):
        merge_checkpoint(run[0] / "run", run[0] / "run" / checkpoint_name(1), overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MergeError, match="is a file"):
        merge_checkpoint(run[0] / "run", tmp_path / "a_file")
    # And a real --overwrite replaces it whole.
    assert merge_checkpoint(run[0] / "run", out, overwrite=True, dtype=torch.float32) == out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_base_model_without_the_adapters_layers_is_refused(run, tmp_path):
    """peft skips adapter tensors whose layer the base model lacks; loading and merging must not."""
    shallow = save_tiny_vlm(tmp_path / "one_layer", num_layers=1, seed=1)  # the checkpoint's has 2
    expected = r"tensors of the adapter .* have no layer in the base model .*layers\.1\..*--base_model"
    with pytest.raises(ModelLoadError, match=expected):
        load_segmenter(run[0] / "run", base_model=shallow, device="cpu")
    with pytest.raises(MergeError, match=expected):
        merge_checkpoint(run[0] / "run", tmp_path / "merged", base_model=shallow)
    assert not (tmp_path / "merged").exists()


def test_command_line_errors_are_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["transform_weight.py", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "transform_weight.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert f"error: model directory {tmp_path / 'none'} does not exist" in capsys.readouterr().err
