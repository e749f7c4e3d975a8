"""--compile_sam: SAM's image encoder compiled block by block gives the eager encoder's outputs."""

import dataclasses
import json
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from model.sam import SAM_VARIANTS, _build_from_spec, _with_attention
from model.sam_compile import (
    compile_image_encoder,
    image_encoder_is_compiled,
    resolve_compile_sam,
    run_image_encoder,
    uncompile_image_encoder,
)
from model.segmenter import ReasonSegmenter
from test_inference import DOG, run_entry
from utils.train_args import build_parser as train_parser


def encoder_with_global_blocks():
    """The tiny SAM with 6 blocks, 2 of them global, as ViT-B/L/H interleave them; SDPA attention."""
    spec = dataclasses.replace(SAM_VARIANTS["tiny"], encoder_depth=6, encoder_global_attn_indexes=(2, 5))
    return _with_attention(_build_from_spec(spec), "sdpa").image_encoder.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_blocks_share_two_graphs_and_names_do_not_change():
    encoder = encoder_with_global_blocks()
    keys = list(encoder.state_dict())
    pixels = torch.randn(2, 3, encoder.img_size, encoder.img_size)
    with torch.no_grad():
        eager = encoder(pixels)
        compile_image_encoder(encoder, backend="aot_eager")
        assert image_encoder_is_compiled(encoder)
        compiled = run_image_encoder(encoder, pixels)
        again = run_image_encoder(encoder, pixels)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=0, atol=1e-5)
    # One graph for the 4 window blocks, one for the 2 global ones: not one per block (32 for ViT-H).
    assert counters["stats"]["unique_graphs"] == 2
    assert list(encoder.state_dict()) == keys  # official names: strict loading still works
    uncompile_image_encoder(encoder)
    assert not image_encoder_is_compiled(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), eager, rtol=0, atol=0)


def test_inductor_through_encode_images(tiny_segmenter_dir):
    model = ReasonSegmenter.from_pretrained(tiny_segmenter_dir("qwen2_5_vl")).eval()
    size = model.sam_transform.image_size
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    sizes = [(size, size), (size // 2, size)]
    with torch.no_grad():
        eager = model.encode_images(pixels, sizes)
        compile_image_encoder(model.sam.image_encoder)
        compiled = model.encode_images(pixels, sizes)
    assert image_encoder_is_compiled(model.sam.image_encoder)  # compiled by inductor, no eager fallback
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_a_compiler_failure_falls_back_to_eager(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    encoder = encoder_with_global_blocks()
    pixels = torch.randn(1, 3, encoder.img_size, encoder.img_size)
    with torch.no_grad():
        eager = encoder(pixels)
        compile_image_encoder(encoder, backend=broken_backend)
        with caplog.at_level(logging.WARNING, logger="model.sam_compile"):
            out = run_image_encoder(encoder, pixels)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert "compiling SAM's image encoder failed" in caplog.text and "no C++ compiler" in caplog.text
    assert not image_encoder_is_compiled(encoder)  # eager from now on, not a failed compile per call


def test_the_flag_on_every_entry_point(tiny_segmenter_dir, tmp_path):
    from utils.eval_args import build_parser as eval_parser

    train = train_parser()
    assert train.parse_args(["--compile_sam"]).compile_sam and train.parse_args([]).compile_sam is None
    assert eval_parser().parse_args(["--version", "x", "--compile_sam"]).compile_sam
    # inference.py with the encoder compiled answers as without it.
    outputs = []
    for flag in ("--no-compile_sam", "--compile_sam"):
        result = run_entry(["inference.py", "--version", tiny_segmenter_dir("qwen2_5_vl"), "--image", DOG,
                            "--prompt", "Where is the dog?", "--max_new_tokens", "8", "--format", "json", flag],
                           timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "image encoder failed" not in result.stderr
        outputs.append(json.loads(result.stdout))
    assert "blocks compiled" in result.stderr
    assert outputs[0] == outputs[1]


def test_batch_sizes_past_torchs_recompile_limit(monkeypatch, caplog):
    """Each batch size compiles two variants (window and global blocks): torch's limit of 8 would
    fail the fifth; ours compiles on, and past it a batch runs eagerly, the others stay compiled."""
    from model import sam_compile

    encoder = encoder_with_global_blocks()
    compile_image_encoder(encoder, backend="aot_eager")
    sizes = torch._dynamo.config.recompile_limit // 2 + 1  # 5 batch sizes: 10 variants
    with torch.no_grad():
        for batch in range(1, sizes + 1):
            pixels = torch.randn(batch, 3, encoder.img_size, encoder.img_size)
            torch.testing.assert_close(run_image_encoder(encoder, pixels), _eager(encoder, pixels), rtol=0, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 2 * sizes
        monkeypatch.setattr(sam_compile, "MAX_COMPILED_VARIANTS", 2 * sizes)
        pixels = torch.randn(sizes + 1, 3, encoder.img_size, encoder.img_size)
        with caplog.at_level(logging.WARNING, logger="model.sam_compile"):
            beyond = run_image_encoder(encoder, pixels)
        torch.testing.assert_close(beyond, _eager(encoder, pixels), rtol=0, atol=1e-5)
        assert "runs eagerly" in caplog.text and image_encoder_is_compiled(encoder)
        assert counters["stats"]["unique_graphs"] == 2 * sizes  # nothing compiled for it
        run_image_encoder(encoder, torch.randn(1, 3, encoder.img_size, encoder.img_size))  # still compiled
        assert counters["stats"]["unique_graphs"] == 2 * sizes


def _eager(encoder, pixels):
    with torch.compiler.set_stance("force_eager"):
        return encoder(pixels)


@pytest.mark.parametrize("flag, device, one_request, expected", [
    (None, "cuda", False, True),  # auto: a long-running process on CUDA compiles
    (None, torch.device("cuda", 1), False, True),
    (None, "cpu", False, False),  # auto: never on a CPU
    (None, "cuda", True, False),  # auto: a one-shot question would pay the compile for one image
    (False, "cuda", False, False),  # --no-compile_sam
    (True, "cpu", False, True),  # --compile_sam, also on a CPU
    (True, "cuda", True, True),
])
def test_compile_sam_auto_is_on_cuda_except_for_one_request(flag, device, one_request, expected):
    assert resolve_compile_sam(flag, device, one_request=one_request) is expected


def test_every_parser_leaves_compile_sam_to_auto_by_default():
    """train_ddp.py, test.py, inference.py and the app: None (auto) unless --compile_sam / --no-compile_sam."""
    import argparse

    from utils.eval_args import build_parser as eval_parser
    from utils.inference_cli import add_session_arguments

    inference = argparse.ArgumentParser()
    add_session_arguments(inference)
    required = {"train": [], "eval": ["--version", "x"], "inference": ["--version", "x"]}
    for name, parser in (("train", train_parser()), ("eval", eval_parser()), ("inference", inference)):
        base = required[name]
        assert parser.parse_args(base).compile_sam is None, name
        assert parser.parse_args([*base, "--compile_sam"]).compile_sam is True, name
        assert parser.parse_args([*base, "--no-compile_sam"]).compile_sam is False, name


@pytest.mark.parametrize("flag, device, one_request, compiled", [
    (None, "cuda", False, True),  # the interactive loop, batch mode, the app
    (None, "cuda", True, False),  # inference.py --image ... --prompt ...
    (None, "cpu", False, False),
    (True, "cuda", True, True),
    (False, "cuda", False, False),
])
def test_inference_session_resolves_compile_sam_on_the_model_device(monkeypatch, flag, device, one_request, compiled):
    """session_from_args compiles by the model's device and whether the process answers one request."""
    import argparse
    import types

    import model.loading
    import model.sam_compile
    import utils.inference_cli as inference_cli

    fake = types.SimpleNamespace(device=torch.device(device), sam=types.SimpleNamespace(image_encoder="encoder"))
    calls = []
    monkeypatch.setattr(model.loading, "load_segmenter", lambda *a, **k: fake)
    monkeypatch.setattr(model.sam_compile, "compile_image_encoder", calls.append)
    monkeypatch.setattr(inference_cli, "InferenceSession", lambda model, **options: (model, options))
    parser = argparse.ArgumentParser()
    inference_cli.add_session_arguments(parser)
    flags = [] if flag is None else ["--compile_sam" if flag else "--no-compile_sam"]
    args = parser.parse_args(["--version", "x", *flags])
    inference_cli.session_from_args(args, one_request=one_request)
    assert calls == (["encoder"] if compiled else [])
