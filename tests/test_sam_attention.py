"""Tests for model/sam_attention.py: SDPA attention in SAM's image encoder equals the official one.

Random weights, random inputs, float32 on the CPU. The relative-position tables are zero in a
freshly built SAM, so every test fills them with random values first: otherwise the bias would
be zero and the comparison would not test it.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from functools import partial

import pytest
import torch

from model.sam import build_sam, sam_modeling
from model.sam_attention import (
    DEFAULT_REL_POS_MODE,
    REL_POS_MODES,
    SdpaAttention,
    attention_implementation,
    rel_pos_table,
    use_fast_attention,
    use_official_attention,
)

ATOL = 1e-4
official = sam_modeling().image_encoder


def randomise_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def vit_b_encoder(depth: int = 2, global_attn_indexes=(1,)) -> torch.nn.Module:
    """A real-size ViT-B image encoder (1024x1024 input, 64x64 tokens, width 768, 12 heads,
    14x14 windows), cut to ``depth`` blocks: one window block and one global block by default."""
    torch.manual_seed(0)
    encoder = official.ImageEncoderViT(
        depth=depth,
        embed_dim=768,
        img_size=1024,
        mlp_ratio=4.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=12,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn_indexes,
        window_size=14,
        out_chans=256,
    ).eval()
    randomise_rel_pos(encoder)
    return encoder


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    sam = build_sam("tiny", attention="official")
    randomise_rel_pos(sam)
    return sam


def test_rel_pos_table_matches_official():
    rel_pos = torch.randn(27, 8)
    for q_size, k_size in [(14, 14), (64, 64), (7, 14), (14, 7), (5, 5)]:
        ours = rel_pos_table(q_size, k_size, rel_pos)
        theirs = official.get_rel_pos(q_size, k_size, rel_pos)
        assert torch.equal(ours, theirs), (q_size, k_size)


@pytest.mark.parametrize("mode", REL_POS_MODES)
def test_tiny_encoder_matches_official(tiny_sam, mode):
    encoder = tiny_sam.image_encoder
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            reference = encoder(x)
            assert use_fast_attention(encoder, mode) == len(encoder.blocks)
            assert attention_implementation(encoder) == f"sdpa:{mode}"
            fast = encoder(x)
    finally:
        use_official_attention(encoder)
    assert (fast - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("mode", REL_POS_MODES)
def test_single_attention_window_and_global_sizes(mode):
    """Window sizes whose key count is not a multiple of 8 (14x14: padded mask rows) and not
    square, and a global size, at ViT-B's head size."""
    torch.manual_seed(0)
    for size in [(14, 14), (8, 8), (12, 20)]:
        attn = official.Attention(768, 12, True, True, True, size).eval()
        randomise_rel_pos(attn)
        x = torch.randn(3, *size, 768)
        fast = SdpaAttention.from_official(attn, mode)
        with torch.no_grad():
            assert (fast(x) - attn(x)).abs().max().item() <= ATOL, size


def test_without_rel_pos():
    attn = official.Attention(64, 4, True, use_rel_pos=False).eval()
    x = torch.randn(2, 5, 6, 64)
    with torch.no_grad():
        assert (SdpaAttention.from_official(attn)(x) - attn(x)).abs().max().item() <= ATOL


def test_vit_b_size_blocks_match_official():
    """Real ViT-B block configuration (64x64 tokens, width 768, 12 heads): a window block
    (14x14 windows over a 70x70 padded grid) and a global block (4,096 tokens), through the
    patch embedding and the neck, in the default mode ("mask")."""
    encoder = vit_b_encoder()
    assert [b.window_size for b in encoder.blocks] == [14, 0]
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = encoder(x)
        assert use_fast_attention(encoder) == 2
        diff = (encoder(x) - reference).abs().max().item()
    assert diff <= ATOL, diff


@pytest.mark.parametrize("mode", ["fold", "fold_flash"])
def test_vit_b_size_fold_modes(mode):
    """The folded modes at real size: ViT-B's window attention on the 25 windows (14x14) of a
    padded 64x64 token grid, and global attention over 64x64 tokens at ViT-B's head size (2 of
    its 12 heads, to keep the CPU time down: heads are independent)."""
    encoder = vit_b_encoder(depth=1, global_attn_indexes=())
    window_attn = encoder.blocks[0].attn
    windows = torch.randn(25, 14, 14, 768, generator=torch.Generator().manual_seed(6))
    global_attn = official.Attention(128, 2, True, True, True, (64, 64)).eval()
    randomise_rel_pos(global_attn, seed=7)
    tokens = torch.randn(1, 64, 64, 128, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for attn, x in [(window_attn, windows), (global_attn, tokens)]:
            fast = SdpaAttention.from_official(attn, mode)
            assert (fast(x) - attn(x)).abs().max().item() <= ATOL


def test_state_dict_unchanged_and_parameters_shared(tiny_sam):
    encoder = tiny_sam.image_encoder
    before = encoder.state_dict()
    params_before = {name: p for name, p in encoder.named_parameters()}
    try:
        assert use_fast_attention(encoder) == len(encoder.blocks)
        after = encoder.state_dict()
        assert list(after) == list(before)
        for name in before:
            assert after[name] is before[name] or after[name].data_ptr() == before[name].data_ptr(), name
        params_after = {name: p for name, p in encoder.named_parameters()}
        assert list(params_after) == list(params_before)
        assert all(params_after[n] is params_before[n] for n in params_before)
        assert use_fast_attention(encoder) == 0  # already fast: nothing to do
        assert isinstance(encoder.blocks[0].attn, official.Attention)  # still an official Attention
    finally:
        assert use_official_attention(encoder) == len(encoder.blocks)
    assert all(type(b.attn) is official.Attention for b in encoder.blocks)
    assert all(dict(encoder.named_parameters())[n] is p for n, p in params_before.items())
    assert attention_implementation(encoder) == "official"


def test_strict_load_of_official_state_dict(tmp_path):
    """An official-format file (torch.save of the official module's state dict) loads strictly
    into a SAM whose encoder was swapped, and gives the official output."""
    torch.manual_seed(0)
    source = build_sam("tiny", attention="official")
    randomise_rel_pos(source, seed=3)
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)

    target = build_sam("tiny", attention="official")
    use_fast_attention(target.image_encoder, "mask")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    result = target.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(target.state_dict()) == set(state_dict)
    # and the swapped encoder's own state dict loads strictly into an official one
    fresh = build_sam("tiny", attention="official")
    fresh.load_state_dict(target.state_dict(), strict=True)

    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (target.image_encoder(x) - source.image_encoder(x)).abs().max().item() <= ATOL
        assert (fresh.image_encoder(x) - source.image_encoder(x)).abs().max().item() <= ATOL


@pytest.mark.parametrize("mode", REL_POS_MODES)
def test_gradients_match_official(mode):
    """Not needed for the frozen encoder, but autograd must work: input and parameter gradients
    equal the official module's (ViT-B head size, 14x14 window)."""
    torch.manual_seed(0)
    attn = official.Attention(192, 3, True, True, True, (14, 14))
    randomise_rel_pos(attn)
    x = torch.randn(2, 14, 14, 192)
    grad_out = torch.randn(2, 14, 14, 192)

    def grads(module):
        module.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        (module(inp) * grad_out).sum().backward()
        return [inp.grad] + [p.grad.clone() for p in module.parameters()]

    theirs = grads(attn)
    ours = grads(SdpaAttention.from_official(attn, mode))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= ATOL


def test_bf16_autocast_and_weights(tiny_sam):
    """bf16 runs (weights in bf16, and fp32 weights under autocast) and stays close to fp32."""
    encoder = tiny_sam.image_encoder
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    try:
        with torch.no_grad():
            reference = encoder(x)
            use_fast_attention(encoder)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast_out = encoder(x)
            encoder.to(torch.bfloat16)
            bf16_out = encoder(x.bfloat16())
    finally:
        encoder.to(torch.float32)
        use_official_attention(encoder)
    for out in (autocast_out, bf16_out):
        rel = (out.float() - reference).norm() / reference.norm()
        assert rel.item() < 3e-2


def test_bad_mode_and_bad_module():
    with pytest.raises(ValueError, match="rel_pos_mode"):
        use_fast_attention(build_sam("tiny").image_encoder, "flash")
    with pytest.raises(TypeError):
        use_fast_attention(torch.nn.Linear(2, 2))


def test_bench_tool_runs_on_cpu(tmp_path):
    """tools/bench_sam_encoder.py's code path on the tiny SAM (the real run is ViT-H on CUDA)."""
    import json

    from tools.bench_sam_encoder import main

    out = tmp_path / "bench.json"
    assert main(["--variant", "tiny", "--device", "cpu", "--dtype", "fp32", "--batches", "1",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["name"] for r in report["rows"]} == {"official", "sdpa:mask", "sdpa:fold", "sdpa:fold_flash"}
    assert not any("error" in r for r in report["rows"])
    assert all(r["max_abs"] <= ATOL for r in report["fp32_equivalence"])
    assert report["flops_per_image"]["flop_counter"] == report["flops_per_image"]["analytic"]["total"]
    assert report["final_attention"].startswith("sdpa:")


def test_build_sam_uses_sdpa_attention_by_default_with_official_keys(tmp_path):
    """The product's SAM (build_sam's default) runs the SDPA attention, loads an official-format
    file strictly and gives the official module's output; attention="official" keeps the original."""
    torch.manual_seed(0)
    official_sam = build_sam("tiny", attention="official")
    randomise_rel_pos(official_sam, seed=5)
    path = tmp_path / "sam_tiny.pth"
    torch.save(official_sam.state_dict(), path)
    default_sam = build_sam("tiny", path)
    assert attention_implementation(default_sam.image_encoder) == f"sdpa:{DEFAULT_REL_POS_MODE}"
    assert attention_implementation(build_sam("tiny", path, attention="official").image_encoder) == "official"
    assert list(default_sam.state_dict()) == list(official_sam.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (default_sam.image_encoder(x) - official_sam.image_encoder(x)).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="attention must be one of"):
        build_sam("tiny", attention="flash")
