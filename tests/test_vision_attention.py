"""Tests for model/vision_attention.py: the Qwen vision towers with one attention call per layer.

Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (model/tiny.py), float32 on the CPU, a batch of
images of different sizes so that the chunks of ``cu_seqlens`` differ in length: in full-attention
layers one chunk per image (112, 48 and 144 patches), in Qwen2.5-VL's window layers windows of 16
and 8 patches (tiny window: 4 x 4 patches). The stock ``sdpa`` (or ``eager``) vision attention is
the reference; attention calls are counted by wrapping ``torch.nn.functional.scaled_dot_product_attention``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

import model.vision_attention as va
from model.tiny import build_tiny_vlm
from model.vision_attention import PACKED_VISION_ATTENTION, use_packed_vision_attention

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
ATOL = 1e-5
IMAGE_SIZES = [(200, 300), (120, 90), (300, 300)]  # grids 8x14, 8x6, 12x12 (Qwen2/2.5; Qwen3 alike)


def tiny(family: str):
    model, processor = build_tiny_vlm(family)
    return model.eval(), processor


def images(sizes=IMAGE_SIZES, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def vision_inputs(processor, sizes=IMAGE_SIZES):
    enc = processor.image_processor(images=images(sizes), return_tensors="pt")
    return enc["pixel_values"].float(), enc["image_grid_thw"]


def set_vision_backend(model, name: str) -> None:
    model.config.vision_config._attn_implementation = name


@contextmanager
def count_sdpa_calls():
    """Count calls of torch.nn.functional.scaled_dot_product_attention (looked up at call time by
    both transformers' sdpa backend and the packed function)."""
    calls = [0]
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def tensors(output) -> list[torch.Tensor]:
    """Every tensor of a tower output (last_hidden_state, pooler_output, Qwen3's deepstack features)."""
    found = []
    for value in output.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def chunk_lengths(model, grid) -> tuple[list[int], list[int]]:
    """Chunk lengths of (full-attention layers, window layers) for this batch."""
    vision = model.config.vision_config
    cu, _ = get_vision_attention_seqlens(grid, vision)
    full = (cu[1:] - cu[:-1]).tolist()
    if model.config.model_type != "qwen2_5_vl":
        return full, []
    _, cu_win = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
    return full, (cu_win[1:] - cu_win[:-1]).tolist()


def layer_kinds(model) -> list[str]:
    vision = model.config.vision_config
    if model.config.model_type != "qwen2_5_vl":
        return ["full"] * vision.depth
    return ["full" if i in vision.fullatt_block_indexes else "window" for i in range(vision.depth)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stock", ["sdpa", "eager"])
def test_packed_equals_stock_one_call_per_layer(family, stock):
    model, processor = tiny(family)
    pixels, grid = vision_inputs(processor)
    full, windows = chunk_lengths(model, grid)
    assert len(set(full)) == 3  # images of three different sizes
    if family == "qwen2_5_vl":
        assert len(set(windows)) > 1  # edge windows are shorter
    kinds = layer_kinds(model)
    set_vision_backend(model, stock)
    with torch.no_grad(), count_sdpa_calls() as calls:
        reference = model.model.visual(pixels, grid_thw=grid)
    stock_calls = sum(len(full) if kind == "full" else len(windows) for kind in kinds)
    assert calls[0] == (stock_calls if stock == "sdpa" else 0)

    assert use_packed_vision_attention(model) is True
    assert model.config.vision_config._attn_implementation == PACKED_VISION_ATTENTION
    assert model.model.visual.config._attn_implementation == PACKED_VISION_ATTENTION
    # the language model is untouched
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad(), count_sdpa_calls() as calls:
        packed = model.model.visual(pixels, grid_thw=grid)
    assert calls[0] == len(kinds)  # one call per layer
    ref_tensors, new_tensors = tensors(reference), tensors(packed)
    assert len(ref_tensors) == len(new_tensors) >= 2
    for a, b in zip(ref_tensors, new_tensors):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal(family):
    """With grad enabled (tower parameters trainable here), input and parameter gradients match."""
    model, processor = tiny(family)
    pixels, grid = vision_inputs(processor)
    weight = None
    results = []
    for backend in ("sdpa", PACKED_VISION_ATTENTION):
        set_vision_backend(model, backend)
        model.zero_grad(set_to_none=True)
        x = pixels.clone().requires_grad_(True)
        out = model.model.visual(x, grid_thw=grid).pooler_output
        if weight is None:
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.model.visual.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad.clone(), grads))
    (out0, gx0, g0), (out1, gx1, g1) = results
    torch.testing.assert_close(out1, out0, atol=ATOL, rtol=0)
    torch.testing.assert_close(gx1, gx0, atol=ATOL, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert any("attn.qkv" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=ATOL, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_mode_and_repeat(family):
    """Works under torch.inference_mode (inference tensors have no version counter) and on a second
    batch of other sizes (the cached index plan is rebuilt for a new cu_seqlens)."""
    model, processor = tiny(family)
    use_packed_vision_attention(model)
    for sizes in (IMAGE_SIZES, [(90, 150), (300, 200)]):
        pixels, grid = vision_inputs(processor, sizes)
        with torch.inference_mode():
            packed = model.model.visual(pixels, grid_thw=grid).pooler_output
        set_vision_backend(model, "sdpa")
        with torch.no_grad():
            reference = model.model.visual(pixels, grid_thw=grid).pooler_output
        set_vision_backend(model, PACKED_VISION_ATTENTION)
        torch.testing.assert_close(packed, reference, atol=ATOL, rtol=0)


def test_split_into_groups_when_padding_is_expensive(monkeypatch):
    """With MAX_PADDING_FLOPS = 0 every length gets its own group (one call per distinct chunk
    length): still exact. At the default the tiny batch is one call per layer (see above)."""
    model, processor = tiny("qwen2_5_vl")
    pixels, grid = vision_inputs(processor)
    full, windows = chunk_lengths(model, grid)
    set_vision_backend(model, "sdpa")
    with torch.no_grad():
        reference = model.model.visual(pixels, grid_thw=grid).pooler_output
    monkeypatch.setattr(va, "MAX_PADDING_FLOPS", 0)
    use_packed_vision_attention(model)
    with torch.no_grad(), count_sdpa_calls() as calls:
        packed = model.model.visual(pixels, grid_thw=grid).pooler_output
    expected = sum(len(set(full)) if kind == "full" else len(set(windows)) for kind in layer_kinds(model))
    assert calls[0] == expected
    torch.testing.assert_close(packed, reference, atol=ATOL, rtol=0)


def test_whole_model_forward_unchanged():
    """The full VLM forward (vision tower + language model over the image tokens) is unchanged, and
    the language model's attention still goes through the stock sdpa backend."""
    model, processor = tiny("qwen2_5_vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    pics = images(IMAGE_SIZES[:2])
    enc = processor(text=[text, text], images=[[pics[0]], [pics[1]]], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**enc).logits
    assert use_packed_vision_attention(model)
    used = []
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, *args, **kwargs):
        used.append(type(module).__name__)
        return original(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("sdpa", spy)
    try:
        with torch.no_grad():
            packed = model(**enc).logits
    finally:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", original)
    torch.testing.assert_close(packed, reference, atol=ATOL, rtol=0)
    assert used and set(used) == {"Qwen2_5_VLAttention"}  # text layers only, never the vision tower


def test_flash_and_custom_backends_left_alone():
    model, _ = tiny("qwen2_5_vl")
    set_vision_backend(model, "flash_attention_2")  # not run: only the decision is tested
    assert use_packed_vision_attention(model) is False
    assert model.config.vision_config._attn_implementation == "flash_attention_2"
    set_vision_backend(model, "flex_attention")
    assert use_packed_vision_attention(model) is False
    assert model.config.vision_config._attn_implementation == "flex_attention"
    assert use_packed_vision_attention(torch.nn.Linear(2, 2)) is False  # no Qwen vision tower


def test_idempotent_and_state_dict_unchanged():
    model, _ = tiny("qwen3_vl")
    keys = list(model.state_dict())
    assert use_packed_vision_attention(model) is True
    assert use_packed_vision_attention(model) is True
    assert list(model.state_dict()) == keys
    assert model.config.vision_config._attn_implementation == PACKED_VISION_ATTENTION
    assert "_attn_implementation_internal" not in model.config.to_dict()["vision_config"]


def test_real_size_plan_qwen2_5_vl():
    """Index plans at real size (no model): Qwen2.5-VL-7B vision, H=16, D=80."""
    flops_per_pair = 4 * 16 * 80
    # 640x480 image: grid 34x46 = 1,564 patches in 30 windows -> one padded [30, 64] group.
    _, cu = get_vision_window_index(torch.tensor([[1, 34, 46]]), 2, 112, 14)
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert len(lengths) == 30 and sum(lengths) == 1564 and max(lengths) == 64
    plan = va._build_plan(cu.tolist(), 1564, flops_per_pair, torch.device("cpu"))
    assert [(g.num_chunks, g.length) for g in plan.groups] == [(30, 64)]
    assert plan.groups[0].mask.shape == (30, 1, 1, 64)
    assert int(plan.groups[0].mask.sum()) == 1564
    # two of them: still one group of 60 windows
    _, cu = get_vision_window_index(torch.tensor([[1, 34, 46]] * 2), 2, 112, 14)
    plan = va._build_plan(cu.tolist(), 3128, flops_per_pair, torch.device("cpu"))
    assert [(g.num_chunks, g.length) for g in plan.groups] == [(60, 64)]
    # 1,280-token image (5,120 patches): 80 full windows, no padding, no mask, no gathers
    _, cu = get_vision_window_index(torch.tensor([[1, 64, 80]]), 2, 112, 14)
    plan = va._build_plan(cu.tolist(), 5120, flops_per_pair, torch.device("cpu"))
    assert [(g.num_chunks, g.length, g.mask) for g in plan.groups] == [(80, 64, None)]
    assert plan.inverse is None
    # full-attention layer, 5,120 + 1,564 patches: padding would waste 122 GFLOP -> two calls
    plan = va._build_plan([0, 5120, 6684], 6684, flops_per_pair, torch.device("cpu"))
    assert [(g.num_chunks, g.length, g.mask) for g in plan.groups] == [(1, 5120, None), (1, 1564, None)]
    # similar images (1,564 and 1,204 patches): 5.1 GFLOP wasted -> one padded call
    plan = va._build_plan([0, 1564, 2768], 2768, flops_per_pair, torch.device("cpu"))
    assert [(g.num_chunks, g.length) for g in plan.groups] == [(2, 1564)]


def test_precomputed_cu_seqlens_reused_across_modes():
    """A cu_seqlens tensor passed in by the caller and reused: first under inference_mode, then
    with grad (the cached plan of inference_mode must not be reused for backward)."""
    model, processor = tiny("qwen2_vl")
    use_packed_vision_attention(model)
    pixels, grid = vision_inputs(processor)
    cu, _ = get_vision_attention_seqlens(grid, model.config.vision_config)
    with torch.inference_mode():
        first = model.model.visual(pixels, grid_thw=grid, cu_seqlens=cu).pooler_output
    x = pixels.clone().requires_grad_(True)
    second = model.model.visual(x, grid_thw=grid, cu_seqlens=cu).pooler_output
    second.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(second.detach(), first.clone(), atol=ATOL, rtol=0)
