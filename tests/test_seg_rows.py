"""The row-sparse forward of the trainable [SEG] rows (model/seg_rows.py) against peft's own.

peft 0.21.2's ``TrainableTokensLayer`` rebuilds the whole embedding / LM-head matrix each forward;
ours must give the same loss and every trainable gradient without doing so, keep peft's
merge / disable paths, and write adapters plain peft reads.
"""

import contextlib

import numpy as np
import pytest
import torch
from peft.tuners.trainable_tokens import TrainableTokensLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import load_photo
from model.segmenter import ReasonSegmenter
from model.seg_rows import RowSparseTrainableTokensLayer, use_row_sparse_trainable_tokens
from model.vlm import LoraSettings

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in FAMILIES]
CASE_IDS = [f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir, tmp_path_factory):
    """Per (family, tied), a tiny Qwen-VL directory; tied: ``lm_head`` shares the embedding
    (as Qwen2.5-VL-3B and Qwen3-VL-2B/4B ship)."""
    import model.tiny as tiny

    cache = {}

    def get(family: str, tied: bool):
        if not tied:
            return tiny_vlm_dir(family)
        if family not in cache:
            original = tiny._tiny_config

            def tied_config(*args, **kwargs):
                config = original(*args, **kwargs)
                config.tie_word_embeddings = True
                return config

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(tiny, "_tiny_config", tied_config)
                cache[family] = tiny.save_tiny_vlm(tmp_path_factory.mktemp(f"tied_{family}"), family)
        return cache[family]

    return get


def perturb(model, scale=0.05):
    """Move every trainable weight off its initial value: the [SEG] rows start equal to the base
    rows and LoRA's B at zero, so a path that ignored them would otherwise pass."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)


def build(vlm_dir, family, tied):
    torch.manual_seed(0)
    model = ReasonSegmenter.from_components(vlm_dir(family, tied), "tiny", lora=LoraSettings(dropout=0.0)).train()
    perturb(model)
    vlm = model.vlm
    head_tied = vlm.get_output_embeddings().token_adapter.tied_adapter is not None
    assert head_tied == tied
    assert (vlm.get_output_embeddings().token_adapter.base_layer.weight is vlm.get_input_embeddings().token_adapter.base_layer.weight) == tied
    return model


def seg_batch(model):
    """Two images, three conversations; [SEG] in the inputs (teacher forcing) and in the labels."""
    dog = load_photo("dog.jpg")
    mask = np.zeros(dog.shape[:2], np.uint8)
    mask[100:300, 200:500] = 1
    first = model.prepare(dog, [("Where is the dog?", "It is [SEG]."), ("And the grass?", "Sure, [SEG] and [SEG].")],
                          [mask, mask, 1 - mask])
    second = model.prepare(dog[:300, :450], [("How many dogs?", "One.")], [])
    batch = model.collate([first, second])
    assert (batch["input_ids"] == model.seg_token_id).sum() == 3
    assert (batch["labels"] == model.seg_token_id).sum() == 3
    return batch


def token_layers(model):
    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]


@contextlib.contextmanager
def peft_original_path(model):
    """Run ``model`` with peft's own TrainableTokensLayer forward."""
    layers = token_layers(model)
    assert layers and all(type(m) is RowSparseTrainableTokensLayer for m in layers)
    for layer in layers:
        layer.__class__ = TrainableTokensLayer
    try:
        yield
    finally:
        use_row_sparse_trainable_tokens(model)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(batch)
    output.loss.backward()
    return output, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class MatrixWatch(TorchDispatchMode):
    """Counts the new outputs of the ops run under it (views and in-place ops left out) shaped
    like a whole vocabulary matrix, (V, H) or (H, V): the ops and their bytes. A count of what is
    allocated, whatever the allocator later reuses; not a timing."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.shapes = {(vocab, hidden), (hidden, vocab)}
        self.full = []
        self.full_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.name.endswith("_"):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                self.full.append(str(func))
                self.full_bytes += t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("family,tied", CASES, ids=CASE_IDS)
def test_loss_and_every_gradient_equal_peft(vlm_dir, family, tied):
    model = build(vlm_dir, family, tied)
    layers = token_layers(model)
    assert len(layers) == 2 and all(type(m) is RowSparseTrainableTokensLayer for m in layers)
    batch = seg_batch(model)
    fast, fast_grads = loss_and_grads(model, batch)
    with peft_original_path(model):
        ref, ref_grads = loss_and_grads(model, batch)
    for part in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        torch.testing.assert_close(getattr(fast, part), getattr(ref, part), rtol=1e-5, atol=0, msg=part)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fast_grads.keys() == ref_grads.keys() == trainable
    for name, grad in fast_grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    rows = [g for n, g in fast_grads.items() if "trainable_tokens_delta" in n]
    assert len(rows) == (1 if tied else 2) and all(g.abs().sum() > 0 for g in rows)


@pytest.mark.parametrize("family,tied", [("qwen2_5_vl", False), ("qwen2_5_vl", True)], ids=["untied", "tied"])
def test_no_whole_matrix_is_built(vlm_dir, family, tied, monkeypatch):
    model = build(vlm_dir, family, tied)
    batch = seg_batch(model)
    vocab, hidden = model.vlm.get_input_embeddings().token_adapter.base_layer.weight.shape

    def refuse(*_args, **_kwargs):
        raise AssertionError("the whole matrix was rebuilt")

    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", refuse)
    watch = MatrixWatch(vocab, hidden)
    with watch:
        model(batch).loss.backward()
    assert watch.full == []
    monkeypatch.undo()
    # The watch does see peft's own path (the check is not vacuous).
    watch = MatrixWatch(vocab, hidden)
    with peft_original_path(model), watch:
        model(batch).loss.backward()
    assert any("index_copy" in op for op in watch.full)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bytes_per_training_step(vlm_dir, tied):
    """What one forward + backward writes, peft's path vs ours (a count, not a timing).

    peft writes four whole matrices (each wrapped layer's rebuilt copy and the dense gradient of
    that copy; tied or not, both layers rebuild), ours none; ours writes a few activation-sized
    tensors instead ((R, T, H) for the embedding, (n, V) logits for the head). At Qwen2.5-VL-7B a
    matrix is 152,064 x 3,584 bf16 = 1.09 GB; at this tiny size activations are as large as the
    matrices, so only the matrix counts are asserted."""
    model = build(vlm_dir, "qwen2_5_vl", tied)
    batch = seg_batch(model)
    weight = model.vlm.get_input_embeddings().token_adapter.base_layer.weight
    vocab, hidden = weight.shape
    matrix = weight.numel() * weight.element_size()
    watches = {}
    for path in ("peft", "row_sparse"):
        model.zero_grad(set_to_none=True)
        context = peft_original_path(model) if path == "peft" else contextlib.nullcontext()
        watches[path] = MatrixWatch(vocab, hidden)
        with context, watches[path]:
            model(batch).loss.backward()
    peft, ours = watches["peft"], watches["row_sparse"]
    assert ours.full == []
    assert peft.full_bytes == 4 * matrix


def test_merge_unmerge_and_disabled_adapters_keep_peft_behaviour(vlm_dir):
    model = build(vlm_dir, "qwen2_5_vl", False).eval()
    vlm = model.vlm
    ids = torch.cat([seg_batch(model)["input_ids"][:1, :40], torch.tensor([[model.seg_token_id]])], 1)

    def logits():
        with torch.no_grad():
            return vlm(input_ids=ids).logits

    fast = logits()
    with peft_original_path(model):
        ref = logits()
        with vlm.disable_adapter():
            ref_disabled = logits()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    with vlm.disable_adapter():
        torch.testing.assert_close(logits(), ref_disabled, rtol=0, atol=0)
    vlm.merge_adapter()
    torch.testing.assert_close(logits(), fast, rtol=1e-5, atol=1e-5)
    vlm.unmerge_adapter()
    torch.testing.assert_close(logits(), fast, rtol=1e-5, atol=1e-5)
    assert all(type(m) is RowSparseTrainableTokensLayer for m in token_layers(model))
    merged = vlm.merge_and_unload()
    assert not token_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, fast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_adapter_loads_with_plain_peft_and_resumes(vlm_dir, tied, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from model.processor import load_processor
    from model.vlm import ensure_seg_token, load_vlm

    model = build(vlm_dir, "qwen2_5_vl", tied)
    model.save_pretrained(tmp_path / "ckpt")
    adapter = tmp_path / "ckpt" / "adapter"

    # The same keys as an adapter written by a model that never had the row-sparse forward.
    with peft_original_path(model):
        model.vlm.save_pretrained(tmp_path / "plain")
    keys = {}
    for name in ("ckpt/adapter", "plain"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            keys[name] = {k: f.get_tensor(k) for k in f.keys()}
    assert keys["ckpt/adapter"].keys() == keys["plain"].keys()
    assert sum("trainable_tokens_delta" in k for k in keys["plain"]) == (1 if tied else 2)
    for k, v in keys["plain"].items():
        torch.testing.assert_close(keys["ckpt/adapter"][k], v, rtol=0, atol=0)

    # Plain peft on the plain base model gives the outputs the trained model gives.
    base = load_vlm(vlm_dir("qwen2_5_vl", tied), dtype=torch.float32)
    ensure_seg_token(base, load_processor(adapter, "qwen2_5_vl").tokenizer)
    plain = PeftModel.from_pretrained(base, adapter).eval()
    assert all(type(m) is TrainableTokensLayer for m in token_layers(plain))
    ids = seg_batch(model)["input_ids"][:1, :48]
    ids = torch.cat([ids, torch.tensor([[model.seg_token_id, 5, model.seg_token_id]])], 1)
    model.eval()
    with torch.no_grad():
        expected = model.vlm(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    # Resume: our loader reads the same trainable weights, row-sparse again, same loss.
    resumed = ReasonSegmenter.from_pretrained(tmp_path / "ckpt", is_trainable=True).train()
    assert len(token_layers(resumed)) == 2
    assert all(type(m) is RowSparseTrainableTokensLayer for m in token_layers(resumed))
    before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    after = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert before.keys() == after.keys()
    for name, param in before.items():
        torch.testing.assert_close(after[name], param, rtol=0, atol=0, msg=name)
    batch = seg_batch(model)
    model.train()
    torch.testing.assert_close(resumed(batch).loss, model(batch).loss, rtol=1e-6, atol=0)


def bare_layer(base, indices):
    layer = TrainableTokensLayer(base, "default")
    layer.update_layer("default", token_indices=indices)
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].add_(torch.randn_like(layer.trainable_tokens_delta["default"]))
    return layer


@pytest.mark.parametrize("kind", ["embedding", "linear", "embedding_padding_row"])
def test_bare_layer_with_several_rows_equals_peft(kind):
    """Several trainable rows (which row a position takes matters), outputs and gradients."""
    torch.manual_seed(0)
    indices = [7, 2, 11]
    if kind == "linear":
        layer = bare_layer(nn.Linear(8, 16, bias=False), indices)
        x = torch.randn(3, 5, 8, requires_grad=True)
    else:
        padding = 2 if kind == "embedding_padding_row" else 0
        layer = bare_layer(nn.Embedding(16, 8, padding_idx=padding), indices)
        x = torch.tensor([[7, 1, 2, 11, 7], [0, 2, 3, 11, 4]])
    layer.requires_grad_(False)
    layer.trainable_tokens_delta["default"].requires_grad_(True)

    def run():
        layer.zero_grad(set_to_none=True)
        if x.is_floating_point():
            x.grad = None
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [layer.trainable_tokens_delta["default"].grad] + ([x.grad] if x.is_floating_point() else [])
        return out.detach(), [g.clone() for g in grads]

    ref, ref_grads = run()
    use_row_sparse_trainable_tokens(layer)
    assert type(layer) is RowSparseTrainableTokensLayer
    with pytest.MonkeyPatch.context() as patch:
        if kind != "embedding_padding_row":  # a trainable padding row is left to peft (its gradient is zero)
            patch.setattr(TrainableTokensLayer, "get_merged_weights", lambda *_: pytest.fail("rebuilt"))
        out, grads = run()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, ref_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
