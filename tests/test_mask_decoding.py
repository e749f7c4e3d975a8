"""One mask-decoder pass for a whole batch gives what the official per-image call gives."""

import numpy as np
import pytest
import torch

from model.losses import mask_bce_loss, mask_dice_loss
from model.mask_decoding import decode_low_res_masks
from model.sam import build_sam, postprocess_masks
from model.segmenter import ReasonSegmenter
from model.vlm import LoraSettings


def assert_same_gradient(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float32 summation order: relative to the gradient's norm, with a floor of 1 for
    gradients that are zero in exact arithmetic (attention key biases) and noise in floats."""
    error = float((actual - expected).norm())
    assert error <= 1e-4 * max(float(expected.norm()), 1.0), f"{name}: |difference| {error:.3g}, |gradient| {float(expected.norm()):.3g}"


def official_low_res(sam, embedding: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """``Sam.mask_decoder`` as LISA calls it: one image, its prompts, one mask each."""
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low_res, _ = sam.mask_decoder(
        image_embeddings=embedding[None], image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
    )
    return low_res


def test_one_pass_equals_the_official_call_per_image_with_gradients():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    prompt_dim = sam.prompt_encoder.embed_dim
    grid = sam.prompt_encoder.image_embedding_size
    embeddings = torch.randn(3, prompt_dim, *grid)
    counts = [2, 0, 3]
    sparse = torch.randn(sum(counts), 1, prompt_dim, requires_grad=True)
    image_index = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))

    batched = decode_low_res_masks(sam, embeddings, image_index, sparse)
    (batched * torch.linspace(-1, 1, batched.numel()).view_as(batched)).sum().backward()
    batched_grads = {name: p.grad.clone() for name, p in sam.mask_decoder.named_parameters() if p.grad is not None}
    sparse_grad = sparse.grad.clone()
    sam.zero_grad()
    sparse.grad = None

    pieces, start = [], 0
    for image, count in enumerate(counts):
        if count:
            pieces.append(official_low_res(sam, embeddings[image], sparse[start : start + count]))
        start += count
    official = torch.cat(pieces)
    (official * torch.linspace(-1, 1, official.numel()).view_as(official)).sum().backward()

    assert batched.shape == official.shape == (5, 1, 4 * grid[0], 4 * grid[1])
    torch.testing.assert_close(batched, official, rtol=1e-5, atol=1e-5)
    assert_same_gradient(sparse_grad, sparse.grad, "sparse prompts")
    assert batched_grads.keys() == {n for n, p in sam.mask_decoder.named_parameters() if p.grad is not None}
    for name, p in sam.mask_decoder.named_parameters():
        if p.grad is not None:
            assert_same_gradient(batched_grads[name], p.grad, name)


def test_batched_masks_per_mask_losses_equal_the_loop(tiny_vlm_dir):
    """The training loss and every trainable gradient equal those of the per-image decoder call
    and the per-mask loss loop that the batched forward replaced."""
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(tiny_vlm_dir("qwen2_5_vl"), "tiny", lora=LoraSettings(dropout=0.0))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (160, 120, 3), dtype=np.uint8),
              rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)]
    masks = [(rng.random(image.shape[:2]) < 0.3).astype(np.uint8) for image in images]
    masks[0][:5] = 255  # ignored pixels
    samples = [
        model.prepare(images[0], [("Where is it?", "It is [SEG]."), ("And that?", "Sure, [SEG] and [SEG].")],
                      [masks[0], 1 - masks[0].clip(0, 1), masks[0]]),
        model.prepare(images[1], [("How many?", "Two.")], []),
        model.prepare(images[2], [("Where?", "[SEG].")], [masks[2]]),
    ]
    batch = model.collate(samples)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    output = model(batch)
    output.loss.backward()
    batched = {name: p.grad.clone() for name, p in trainable.items()}
    model.zero_grad()

    language = model.teacher_forced(batch)
    seg_states = language.seg_states
    embeddings = model.encode_images(batch["sam_pixel_values"], batch["sam_input_size"])
    bce, dice = [], []
    for image, (states, gt) in enumerate(zip(seg_states, batch["masks"])):
        if not len(states):
            continue
        low_res = official_low_res(model.sam, embeddings[image], model.projection(states))
        logits = postprocess_masks(low_res, batch["sam_input_size"][image], batch["original_size"][image], 256)[:, 0]
        for index in range(len(gt)):
            bce.append(mask_bce_loss(logits[index], gt[index]))
            dice.append(mask_dice_loss(logits[index], gt[index]))
    config = model.config
    loss = (config.ce_weight * language.ce_loss + config.bce_weight * torch.stack(bce).mean()
            + config.dice_weight * torch.stack(dice).mean())
    loss.backward()

    assert output.num_masks == len(bce) == 4
    assert [len(m) for m in output.mask_logits] == [3, 0, 1]
    torch.testing.assert_close(output.loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in trainable.items():
        assert_same_gradient(batched[name], p.grad, name)


@pytest.mark.parametrize("shape", [(2, 7, 9), (7, 9)])
def test_mask_losses_reduce_per_mask(shape):
    torch.manual_seed(0)
    logits = torch.randn(shape)
    target = (torch.rand(shape) < 0.4).to(torch.uint8)
    target[..., 0, :] = 255
    bce, dice = mask_bce_loss(logits, target), mask_dice_loss(logits, target)
    assert bce.shape == dice.shape == shape[:-2]
    for index in np.ndindex(*shape[:-2]):
        torch.testing.assert_close(bce[index], mask_bce_loss(logits[index], target[index]))
        torch.testing.assert_close(dice[index], mask_dice_loss(logits[index], target[index]))
