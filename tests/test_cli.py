"""The command-line pieces the entry points share (utils/cli.py) and the names behind them."""

import argparse
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from model.constants import CONVERSATION_MODES, PRECISION_NAMES
from model.loading import ModelLoadError, resolve_precision
from model.vlm import parse_target_modules
from utils import cli
from utils.mixed_precision import PRECISIONS


def flags(parser: argparse.ArgumentParser) -> dict:
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


def inference_parser() -> argparse.ArgumentParser:
    from utils.inference_cli import add_session_arguments

    parser = argparse.ArgumentParser()
    add_session_arguments(parser)
    return parser


def test_the_precision_names_are_those_of_the_dtypes_and_of_every_parser():
    from utils.eval_args import build_parser as eval_parser
    from utils.train_args import build_parser as train_parser

    assert tuple(PRECISIONS) == PRECISION_NAMES
    assert [resolve_precision(name, torch.device("cpu")) for name in PRECISION_NAMES] == list(PRECISIONS.values())
    for parser in (train_parser(), eval_parser(), inference_parser()):
        assert tuple(flags(parser)["--precision"].choices) == PRECISION_NAMES


def test_conversation_modes_are_one_list():
    from utils.train_args import build_parser

    assert tuple(flags(build_parser())["--conversation_mode"].choices) == CONVERSATION_MODES


def test_inference_and_test_py_share_the_model_flags():
    from utils.eval_args import build_parser

    shared = ("--version", "--pick", "--base_model", "--vision_pretrained", "--precision", "--compile_sam",
              "--min_pixels", "--max_pixels")
    ours, theirs = flags(inference_parser()), flags(build_parser())
    for flag in shared:
        assert (ours[flag].help, ours[flag].default, ours[flag].choices) == (
            theirs[flag].help, theirs[flag].default, theirs[flag].choices), flag
    assert "hub id" in ours["--base_model"].help
    # --decoding differs only in what "auto" means there.
    assert ours["--decoding"].choices == theirs["--decoding"].choices and ours["--decoding"].help != theirs["--decoding"].help


def test_pixel_help_follows_the_default_cap(monkeypatch):
    def max_pixels_help() -> str:
        parser = argparse.ArgumentParser()
        cli.add_pixel_arguments(parser)
        return flags(parser)["--max_pixels"].help

    assert "1,280 tokens: 1,003,520 pixels for Qwen2/2.5-VL, 1,310,720 pixels for Qwen3-VL" in max_pixels_help()
    monkeypatch.setattr(cli, "DEFAULT_MAX_IMAGE_TOKENS", 1000)
    assert "1,000 tokens: 784,000 pixels for Qwen2/2.5-VL, 1,024,000 pixels for Qwen3-VL" in max_pixels_help()


def test_the_training_flags_import_no_torch():
    """train_ddp.py parses its flags (and answers --help) before torch loads."""
    code = "import sys, utils.train_args; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# Run in a fresh interpreter: the entry point's --help, then a flag it does not have, each to its
# SystemExit; prints the exit codes and which heavy libraries got imported on the way.
_FLAGS_ONLY = """
import contextlib, io, json, runpy, sys
codes = []
for flags in (["--help"], ["--no_such_flag"]):
    sys.argv = [SCRIPT, *flags]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            runpy.run_path(SCRIPT, run_name="__main__")
        except SystemExit as exit:
            codes.append(exit.code)
heavy = sorted({"torch", "transformers", "peft", "gradio", "cv2"} & set(sys.modules))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


@pytest.mark.parametrize("script", [
    "inference.py",
    "test.py",
    "train_ddp.py",
    "transform_weight.py",
    "tools/app.py",
])
def test_help_and_flag_errors_import_no_heavy_library(script):
    """--help and a wrong flag answer at once: torch alone takes seconds to import."""
    code = f"SCRIPT = {script!r}\n" + _FLAGS_ONLY
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"codes": [0, 2], "heavy": []}, report


@pytest.mark.parametrize("script", ["inference.py", "test.py", "transform_weight.py", "train_ddp.py"])
def test_entry_points_run_from_another_directory(script, tmp_path):
    """Python puts the script's own directory first on sys.path: no entry point needs to."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--version" in result.stdout or "--ckpt" in result.stdout


def test_inference_py_passes_pick_to_the_loader(tmp_path, monkeypatch):
    seen = {}

    def load_segmenter(version, **kwargs):
        seen.update(kwargs, version=version)
        raise ModelLoadError("stop here")

    monkeypatch.setattr("model.loading.load_segmenter", load_segmenter)
    monkeypatch.setattr(sys, "argv", ["inference.py", "--version", str(tmp_path), "--pick", "best"])
    with pytest.raises(SystemExit, match="error: stop here"):
        runpy.run_path(str(REPO / "inference.py"), run_name="__main__")
    assert seen["version"] == str(tmp_path) and seen["pick"] == "best"


def test_environment_defaults_do_not_override_the_callers(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cli.setup_environment(offline_hub=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    cli.setup_environment()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["HF_HUB_OFFLINE"] == "1"


def test_target_modules_as_typed():
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("all-linear") == ["all-linear"]
    assert parse_target_modules(" , ") == []
