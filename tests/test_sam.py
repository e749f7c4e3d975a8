"""Tests for model/sam.py: building, checkpoints, pre/postprocessing, freezing."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from model.sam import (  # noqa: E402
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SAM_VARIANTS,
    SamCheckpointError,
    SamTransform,
    build_sam,
    detect_sam_variant,
    freeze_for_segmentation,
    infer_variant_from_checkpoint,
    postprocess_masks,
    sam_image_size,
    sam_modeling,
    sam_prompt_embed_dim,
)


def reference_preprocess_shape(oldh, oldw, long_side_length):
    """segment_anything.utils.transforms.ResizeLongestSide.get_preprocess_shape, re-typed here
    because importing that module needs torchvision."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


@pytest.fixture
def sample_image_path():
    """name -> path of a sample photograph: tests/data/<name>, else <repo>/../shared/samples/<name>."""

    def find(name: str) -> Path:
        for candidate in (REPO_ROOT / "tests" / "data" / name, REPO_ROOT.parent / "shared" / "samples" / name):
            if candidate.is_file():
                return candidate
        pytest.skip(f"sample image {name} not found")

    return find


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_sam("tiny")


def _state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_keys_and_shapes(variant):
    sam_modeling()
    official_build = importlib.import_module("segment_anything.build_sam")
    with torch.device("meta"):
        official = official_build.sam_model_registry[variant]()
        ours = build_sam(variant)
    theirs_sd, ours_sd = official.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert type(ours) is type(official)
    assert detect_sam_variant(ours_sd) == variant
    assert sam_image_size(ours) == 1024
    assert sam_prompt_embed_dim(ours) == 256
    assert torch.equal(ours.pixel_mean.flatten().cpu(), torch.tensor(SAM_PIXEL_MEAN))
    assert torch.equal(ours.pixel_std.flatten().cpu(), torch.tensor(SAM_PIXEL_STD))


def test_variant_specs():
    h = SAM_VARIANTS["vit_h"]
    assert (h.encoder_embed_dim, h.encoder_depth, h.encoder_num_heads) == (1280, 32, 16)
    assert h.encoder_global_attn_indexes == (7, 15, 23, 31)
    assert (h.image_size, h.patch_size, h.window_size, h.prompt_embed_dim) == (1024, 16, 14, 256)
    assert (h.decoder_depth, h.decoder_mlp_dim, h.decoder_num_heads) == (2, 2048, 8)
    assert (h.iou_head_hidden_dim, h.num_multimask_outputs) == (256, 3)
    assert h.image_embedding_size == 64
    t = SAM_VARIANTS["tiny"]
    assert t.image_size == 256 and t.image_embedding_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.image_size = 512


def test_unknown_variant():
    with pytest.raises(ValueError, match="vit_h.*vit_l.*vit_b.*tiny"):
        build_sam("vit_x")


def test_tiny_forward_shapes_and_speed(tiny_sam, sample_image_path):
    sam = tiny_sam
    transform = SamTransform.from_sam(sam)
    assert transform.image_size == 256
    image = np.array(Image.open(sample_image_path("dog.jpg")).convert("RGB"))
    sam_input = transform.preprocess(image)
    pixels = transform.normalize(sam_input.pixel_values[None], [sam_input.input_size])
    c = sam_prompt_embed_dim(sam)
    n = 3
    prompts = torch.randn(n, 1, c)

    def run():
        with torch.no_grad():
            emb = sam.image_encoder(pixels)
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            low_res, iou = sam.mask_decoder(
                image_embeddings=emb,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=prompts,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return emb, sparse, dense, low_res, iou

    emb, sparse, dense, low_res, iou = run()
    assert emb.shape == (1, c, 32, 32)
    assert sparse.shape == (1, 0, c) and dense.shape == (1, c, 32, 32)
    assert low_res.shape == (n, 1, 128, 128) and iou.shape == (n, 1)
    masks = postprocess_masks(low_res, sam_input.input_size, sam_input.original_size, transform.image_size)
    assert masks.shape == (n, 1, image.shape[0], image.shape[1])


def test_freeze_for_segmentation(tiny_sam):
    sam = build_sam("tiny")
    sam.train()
    freeze_for_segmentation(sam)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    decoder = {f"mask_decoder.{n}" for n, _ in sam.mask_decoder.named_parameters()}
    assert trainable == decoder and decoder
    assert not sam.image_encoder.training and not sam.prompt_encoder.training

    # Gradients reach the decoder and the [SEG] prompts, never the encoders.
    transform = SamTransform.from_sam(sam)
    sam_input = transform.preprocess(np.full((40, 60, 3), 128, np.uint8))
    with torch.no_grad():
        emb = sam.image_encoder(transform.normalize(sam_input.pixel_values[None], [sam_input.input_size]))
        _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    prompts = torch.randn(2, 1, sam_prompt_embed_dim(sam), requires_grad=True)
    low_res, _ = sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=prompts,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    masks = postprocess_masks(low_res, sam_input.input_size, sam_input.original_size, transform.image_size)
    masks.sigmoid().mean().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert sum(p.grad.abs().sum() for p in sam.mask_decoder.parameters() if p.grad is not None) > 0


# ------------------------------------------------------------------------------------- imports

_TORCHVISION_STUB = {
    "torchvision/__init__.py": "",
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": "def resize(*a, **k): raise NotImplementedError\n"
    "def to_pil_image(*a, **k): raise NotImplementedError\n",
    "torchvision/ops/__init__.py": "",
    "torchvision/ops/boxes.py": "def batched_nms(*a, **k): raise NotImplementedError\n"
    "def box_area(*a, **k): raise NotImplementedError\n",
}


def _run_python(code: str, extra_path: Path | None = None) -> None:
    env = dict(os.environ)
    paths = ([str(extra_path)] if extra_path else []) + [str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_import_does_not_import_torchvision():
    # This machine has no torchvision: the bare segment_anything entry stays registered.
    _run_python(
        """
        import importlib.util, pickle, sys
        assert importlib.util.find_spec("torchvision") is None
        import model.sam as ms
        assert "segment_anything" not in sys.modules  # lazy
        sam = ms.build_sam("tiny")
        assert "torchvision" not in sys.modules
        assert "segment_anything.modeling" in sys.modules
        pickle.loads(pickle.dumps(sam.mask_decoder))  # classes resolvable by name
        """
    )


def test_with_torchvision_segment_anything_imported_first(tmp_path):
    for rel, text in _TORCHVISION_STUB.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    _run_python(
        """
        import sys
        import segment_anything
        import model.sam as ms
        assert ms.sam_modeling() is sys.modules["segment_anything.modeling"]
        assert sys.modules["segment_anything"] is segment_anything
        assert isinstance(ms.build_sam("tiny"), segment_anything.modeling.Sam)
        """,
        tmp_path,
    )
    # model.sam first: the bare package entry is dropped again, so the real package (with its
    # predictor) can still be imported afterwards and shares the same modeling classes.
    _run_python(
        """
        import sys
        import model.sam as ms
        sam = ms.build_sam("tiny")
        assert "torchvision" not in sys.modules and "segment_anything" not in sys.modules
        from segment_anything import SamPredictor, sam_model_registry
        import segment_anything.modeling as modeling
        assert type(sam) is modeling.Sam
        """,
        tmp_path,
    )


# ------------------------------------------------------------------------------------- checkpoints


def test_roundtrip_pth(tmp_path, tiny_sam):
    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = build_sam("tiny", path)
    assert _state_dicts_equal(loaded.state_dict(), tiny_sam.state_dict())
    assert not loaded.training
    assert infer_variant_from_checkpoint(path) == "tiny"


def test_roundtrip_safetensors(tmp_path, tiny_sam):
    from safetensors.torch import save_file

    path = tmp_path / "sam_tiny.safetensors"
    save_file(tiny_sam.state_dict(), str(path))
    loaded = build_sam("tiny", str(path))
    assert _state_dicts_equal(loaded.state_dict(), tiny_sam.state_dict())
    assert infer_variant_from_checkpoint(path) == "tiny"


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_nested_state_dict(tmp_path, tiny_sam, key):
    path = tmp_path / "nested.pt"
    torch.save({key: tiny_sam.state_dict(), "epoch": 3}, path)
    assert _state_dicts_equal(build_sam("tiny", path).state_dict(), tiny_sam.state_dict())


def test_missing_file(tmp_path):
    path = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_sam("vit_h", path)
    msg = str(info.value)
    assert str(path) in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    assert "weights/" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, tiny_sam, suffix):
    from safetensors.torch import save_file

    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save(tiny_sam.state_dict(), full)
    else:
        save_file(tiny_sam.state_dict(), str(full))
    data = full.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: len(data) // 2])
    for call in (lambda: build_sam("tiny", path), lambda: infer_variant_from_checkpoint(path)):
        with pytest.raises(SamCheckpointError) as info:
            call()
        assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
        assert isinstance(info.value, ValueError)


def test_wrong_variant(tmp_path, tiny_sam):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(SamCheckpointError) as info:
        build_sam("vit_b", path)
    msg = str(info.value)
    assert str(path) in msg and "expected vit_b" in msg and "file contains tiny" in msg


def test_unknown_sam_config(tmp_path, tiny_sam):
    state_dict = {k: v for k, v in tiny_sam.state_dict().items() if not k.startswith("image_encoder.blocks.1.")}
    assert detect_sam_variant(state_dict) is None
    path = tmp_path / "odd.pth"
    torch.save(state_dict, path)
    with pytest.raises(SamCheckpointError, match="expected tiny.*no known variant.*encoder_depth=1"):
        build_sam("tiny", path)
    with pytest.raises(SamCheckpointError, match="no known variant"):
        infer_variant_from_checkpoint(path)


def test_not_sam(tmp_path, tiny_sam):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(SamCheckpointError) as info:
        build_sam("vit_b", path)
    assert str(path) in str(info.value) and "not a SAM checkpoint" in str(info.value)

    tensor_path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_path)
    with pytest.raises(SamCheckpointError, match="not a SAM checkpoint"):
        build_sam("tiny", tensor_path)

    # LISA-style full checkpoint: SAM weights under a prefix -> the message says which.
    prefixed = tmp_path / "lisa.pth"
    torch.save({f"model.visual_model.{k}": v for k, v in tiny_sam.state_dict().items()}, prefixed)
    with pytest.raises(SamCheckpointError, match="prefix 'model.visual_model.'"):
        build_sam("tiny", prefixed)

    with pytest.raises(SamCheckpointError, match="not a file"):
        build_sam("tiny", tmp_path)


class _Arbitrary:
    pass


def test_pickled_objects_refused(tmp_path, tiny_sam):
    path = tmp_path / "objects.pth"
    torch.save({**tiny_sam.state_dict(), "extra": _Arbitrary()}, path)
    with pytest.raises(SamCheckpointError, match="weights_only"):
        build_sam("tiny", path)


# ------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "shape, image_size",
    [((1200, 1800), 1024), ((1800, 1200), 1024), ((534, 800), 1024), ((300, 300), 256), ((90, 1000), 256), ((256, 100), 256)],
)
def test_preprocess_shapes_and_padding(shape, image_size):
    h, w = shape
    color = np.array([200, 30, 90], np.uint8)
    image = np.broadcast_to(color, (h, w, 3)).copy()
    transform = SamTransform(image_size)
    out = transform.preprocess(image)
    expected = reference_preprocess_shape(h, w, image_size)
    assert out.input_size == expected
    assert out.original_size == (h, w)
    assert out.pixel_values.shape == (3, image_size, image_size) and out.pixel_values.dtype == torch.uint8
    ih, iw = expected
    assert max(ih, iw) == image_size
    assert abs(ih / iw - h / w) <= 1.0 / min(ih, iw)  # aspect ratio kept up to rounding
    assert torch.all(out.pixel_values[:, :ih, :iw] == torch.tensor(color).view(3, 1, 1))
    px = transform.normalize(out.pixel_values[None], [out.input_size])[0]
    assert px.dtype == torch.float32
    assert torch.all(px[:, ih:, :] == 0) and torch.all(px[:, :, iw:] == 0)
    normalised = (torch.tensor(color, dtype=torch.float32) - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(px[:, :ih, :iw], normalised.view(3, 1, 1).expand(3, ih, iw))


def test_an_image_thinner_than_2048_to_1_keeps_one_pixel_row():
    """The official arithmetic rounds the short side of a 1 x 3000 image to 0 (and PIL fails)."""
    assert reference_preprocess_shape(1, 3000, 1024) == (0, 1024)
    out = SamTransform(1024).preprocess(np.full((1, 3000, 3), 200, np.uint8))
    assert out.input_size == (1, 1024) and out.original_size == (1, 3000)
    assert torch.all(out.pixel_values[:, :1, :] == 200) and torch.all(out.pixel_values[:, 1:, :] == 0)


def test_truck_1800x1200(sample_image_path):
    image = np.array(Image.open(sample_image_path("truck.jpg")).convert("RGB"))
    assert image.shape == (1200, 1800, 3)
    out = SamTransform(1024).preprocess(image)
    assert out.input_size == (683, 1024) == reference_preprocess_shape(1200, 1800, 1024)
    assert out.original_size == (1200, 1800)
    assert torch.all(out.pixel_values[:, 683:] == 0)
    assert out.pixel_values[:, :683].sum() > 0


def test_preprocess_matches_sam_preprocess(tiny_sam):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 333, 3), dtype=np.uint8)
    transform = SamTransform.from_sam(tiny_sam)
    out = transform.preprocess(image)
    resized = transform.resize(image)
    assert resized.shape[:2] == out.input_size
    official = tiny_sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1).float())
    ours = transform.normalize(out.pixel_values[None], [out.input_size])[0]
    assert torch.equal(ours, official)  # bit for bit: the same float32 operations
    # A batch of differently sized images: each normalised inside its own size only.
    small = transform.preprocess(image[:40, :90])
    both = transform.normalize(torch.stack([out.pixel_values, small.pixel_values]), [out.input_size, small.input_size])
    assert torch.equal(both[0], ours)
    h, w = small.input_size
    assert torch.all(both[1, :, h:] == 0) and torch.all(both[1, :, :, w:] == 0) and both[1, :, :h, :w].abs().sum() > 0
    with pytest.raises(TypeError, match="uint8"):
        transform.normalize(ours[None], [out.input_size])
    with pytest.raises(ValueError, match="input sizes"):
        transform.normalize(out.pixel_values[None], [])


def test_preprocess_input_forms():
    transform = SamTransform(256)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    reference = transform.preprocess(rgb).pixel_values
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], axis=2)
    assert torch.equal(transform.preprocess(rgba).pixel_values, reference)
    assert torch.equal(transform.preprocess(Image.fromarray(rgb)).pixel_values, reference)
    assert torch.equal(transform.preprocess(rgb[:, ::-1][:, ::-1]).pixel_values, reference)  # strided view
    gray = rgb[:, :, 0]
    assert torch.equal(
        transform.preprocess(gray).pixel_values, transform.preprocess(np.repeat(gray[:, :, None], 3, 2)).pixel_values
    )
    assert transform.preprocess(gray[:, :, None]).pixel_values.shape == (3, 256, 256)
    with pytest.raises(TypeError, match="uint8"):
        transform.preprocess(rgb.astype(np.float32) / 255)
    with pytest.raises(TypeError):
        transform.preprocess(rgb.tolist())
    with pytest.raises(ValueError, match="HxWx3"):
        transform.preprocess(rgb[:, :, :2])
    with pytest.raises(ValueError, match="Empty"):
        transform.preprocess(np.zeros((0, 5, 3), np.uint8))


# ------------------------------------------------------------------------------------- postprocessing


def test_postprocess_rectangle_and_padding(tiny_sam):
    image_size = 256
    original = (300, 450)
    input_size = reference_preprocess_shape(*original, image_size)  # (171, 256)
    low = torch.full((2, 2, 64, 64), -10.0)
    r0, r1, c0, c1 = 10, 30, 12, 50
    low[:, 0, r0:r1, c0:c1] = 10.0
    low[:, 1, 50:60, 10:20] = 10.0  # inside the padding (rows >= 171 / 4): must vanish
    low.requires_grad_(True)

    out = postprocess_masks(low, input_size, original, image_size)
    assert out.shape == (2, 2, *original)
    # Same numbers as the official Sam.postprocess_masks.
    assert torch.equal(out, tiny_sam.postprocess_masks(low, input_size, original))

    sy, sx = original[0] / input_size[0], original[1] / input_size[1]
    ys = torch.arange(original[0]).view(-1, 1) + 0.5
    xs = torch.arange(original[1]).view(1, -1) + 0.5
    expected = (ys > 4 * r0 * sy) & (ys < 4 * r1 * sy) & (xs > 4 * c0 * sx) & (xs < 4 * c1 * sx)
    pred = out[0, 0] > 0
    iou = (pred & expected).sum() / (pred | expected).sum()
    assert iou > 0.97
    inner = (ys > 4 * r0 * sy + 3) & (ys < 4 * r1 * sy - 3) & (xs > 4 * c0 * sx + 3) & (xs < 4 * c1 * sx - 3)
    assert pred[inner].all() and not pred[~expected & ~_dilate(expected, 3)].any()
    assert not (out[:, 1] > 0).any()

    out[:, 0].sigmoid().sum().backward()
    assert low.grad is not None and torch.isfinite(low.grad).all() and low.grad[:, 0].abs().sum() > 0


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0


def test_postprocess_validation():
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        postprocess_masks(torch.zeros(1, 64, 64), (100, 100), (100, 100), 256)
    with pytest.raises(ValueError, match="does not fit"):
        postprocess_masks(torch.zeros(1, 1, 64, 64), (300, 100), (300, 100), 256)
    # Sizes from a collated batch (tensors) are accepted.
    out = postprocess_masks(torch.zeros(1, 1, 64, 64), torch.tensor([100, 256]), torch.tensor([50, 128]), 256)
    assert out.shape == (1, 1, 50, 128)
