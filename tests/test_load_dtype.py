"""Every path loads the model straight into the dtype it runs in (issue 10).

Frozen weights are read into the run dtype on their device (no float32 copy first); only the
trainable ones (LoRA, the [SEG] rows, the projection, SAM's mask decoder) are float32 master
weights; SAM's prompt encoder stays float32.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from model.config import SegmenterConfig
from model.loading import load_segmenter
from model.projection import SegProjection
from model.sam import SAM_PIXEL_MEAN, build_sam, sam_prompt_embed_dim
from model.segmenter import ReasonSegmenter
from utils.train_args import build_parser
from utils.trainer import build_model

PROMPT_ENCODER = "sam.prompt_encoder."
IOU_HEAD = "sam.mask_decoder.iou_prediction_head."  # frozen, but float32 with the rest of the decoder in training


def train_args(version, sam_file=None, *extra):
    argv = ["--version", str(version), "--lora_dropout", "0", *extra]
    if sam_file is not None:
        argv += ["--vision_pretrained", str(sam_file), "--vision_model", "tiny"]
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory):
    """A tiny SAM in the official format (a float32 state dict saved with torch.save)."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.manual_seed(1)
    torch.save(build_sam("tiny").state_dict(), path)
    return path


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


# ----------------------------------------------------------------------------- dtypes


def test_training_build_in_bf16_has_frozen_bf16_and_trainable_fp32(tiny_vlm_dir, tiny_sam_file):
    args = train_args(tiny_vlm_dir("qwen2_5_vl"), tiny_sam_file)
    torch.manual_seed(0)
    reference = build_model(args, None, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    model = build_model(args, None, dtype=torch.bfloat16, device="cpu")
    assert trainable_names(model) == trainable_names(reference)  # the trainable set is unchanged
    for name, param in model.named_parameters():
        if name.startswith((PROMPT_ENCODER, IOU_HEAD)):
            assert param.dtype == torch.float32, name
        elif param.requires_grad:
            assert param.dtype == torch.float32, name
        else:
            assert param.dtype == torch.bfloat16, name
    # SAM's frozen image encoder too; the trainable decoder is read from the file without a bf16 round trip.
    assert model.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    official = torch.load(tiny_sam_file, map_location="cpu", weights_only=True)
    for key, value in model.sam.mask_decoder.state_dict().items():
        assert torch.equal(value, official[f"mask_decoder.{key}"]), key
    assert torch.equal(model.sam.pixel_mean.flatten(), torch.tensor(SAM_PIXEL_MEAN))
    assert not any(t.is_meta for t in model.state_dict().values())


def test_resumed_and_segmenter_directory_training_keep_trainable_weights_exact(tiny_vlm_dir, tiny_sam_file, tmp_path):
    """A bf16 run resumed from a checkpoint gets back its float32 trainable weights bit for bit."""
    args = train_args(tiny_vlm_dir("qwen2_5_vl"), tiny_sam_file)
    torch.manual_seed(0)
    model = build_model(args, None, dtype=torch.float32, device="cpu")
    with torch.no_grad():  # trained weights that bf16 cannot hold exactly
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 1e-3)
    saved = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    model.save_pretrained(tmp_path / "ckpt", include_sam=False)
    resumed = build_model(args, tmp_path / "ckpt", dtype=torch.bfloat16, device="cpu")
    assert trainable_names(resumed) == set(saved)
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and torch.equal(param, saved[name]), name
        elif not name.startswith((PROMPT_ENCODER, IOU_HEAD)):
            assert param.dtype == torch.bfloat16, name

    # A standalone segmenter directory as --version: its head trains in float32 as saved.
    standalone = ReasonSegmenter.from_pretrained(tmp_path / "ckpt")
    standalone.vlm = standalone.vlm.merge_and_unload()
    standalone.save_pretrained(tmp_path / "standalone")
    started = build_model(train_args(tmp_path / "standalone"), None, dtype=torch.bfloat16, device="cpu")
    for name, param in [*started.projection.named_parameters(), *started.sam.mask_decoder.named_parameters()]:
        assert param.dtype == torch.float32, name
    assert torch.equal(started.projection.fc1.weight, saved["projection.fc1.weight"])
    assert all(p.dtype == torch.bfloat16 for n, p in started.vlm.named_parameters() if not p.requires_grad)


def test_inference_load_in_bf16_is_bf16_except_the_prompt_encoder(tiny_segmenter_dir):
    model = load_segmenter(tiny_segmenter_dir(), precision="bf16", device="cpu")
    wrong = [n for n, p in model.named_parameters() if p.dtype != (torch.float32 if n.startswith(PROMPT_ENCODER) else torch.bfloat16)]
    assert not wrong, wrong
    # Buffers are left as transformers loads them: the rotary frequencies stay float32.
    inv_freq = [b for n, b in model.vlm.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    fp32 = load_segmenter(tiny_segmenter_dir(), precision="fp32", device="cpu")
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


# ----------------------------------------------------------------------------- memory


def _write_midsize_segmenter(root, tiny_sam_file):
    """A ~330 M-parameter random Qwen2.5-VL (152k vocabulary, hidden 1024, 2 layers) in bf16.

    Written as a segmenter directory whose ``vlm/`` is also a plain Qwen-VL directory for training.
    Built on the meta device and filled in bf16: no float32 copy here either.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from model.processor import save_processor
    from model.tiny import QWEN_SPECIAL_TOKENS, _tiny_config, build_tiny_vlm

    _, processor = build_tiny_vlm("qwen2_5_vl", hidden_size=64, num_layers=1)
    token_ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = _tiny_config("qwen2_5_vl", 152064, token_ids, hidden_size=1024, num_layers=2)
    with torch.device("meta"):
        vlm = Qwen2_5_VLForConditionalGeneration(config)
    vlm.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in vlm.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    numel = sum(p.numel() for p in vlm.parameters())
    vlm.config.dtype = torch.bfloat16
    vlm.save_pretrained(root / "vlm")
    save_processor(processor, root / "vlm", "qwen2_5_vl")
    del vlm
    sam_state = torch.load(tiny_sam_file, map_location="cpu", weights_only=True)
    save_file({k: v.to(torch.bfloat16) for k, v in sam_state.items()}, root / "sam.safetensors")
    prompt_dim = sam_prompt_embed_dim(build_sam("tiny", tiny_sam_file))
    head = {f"projection.{k}": v for k, v in SegProjection(1024, prompt_dim).state_dict().items()}
    head.update({k: v for k, v in sam_state.items() if k.startswith("mask_decoder.")})
    save_file(head, root / "head.safetensors")
    SegmenterConfig(vlm_family="qwen2_5_vl", sam_variant="tiny", hidden_size=1024, prompt_dim=prompt_dim).save_pretrained(root)
    return numel


_MEASURE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
import peft  # imported by the loaders on first use: part of the baseline
from model.loading import load_segmenter
from utils.train_args import build_parser
from utils.trainer import build_model

def peak_mb():
    # The peak resident memory of this process image. ru_maxrss would do, but Linux carries the
    # parent's peak over the fork/exec into it (pytest's own size): VmHWM starts afresh at exec.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

mode, version, sam_file = sys.argv[1:4]
baseline = peak_mb()
if mode == "train":
    args = build_parser().parse_args(["--version", version, "--vision_pretrained", sam_file, "--vision_model", "tiny"])
    model = build_model(args, None, dtype=torch.bfloat16, device="cpu")
else:
    model = load_segmenter(version, precision="bf16", device="cpu")
# Read every weight, as a forward pass would: memory-mapped weights count once resident.
checksum = sum(float(t.float().sum()) if t.numel() < 2**20 else float(t.sum()) for t in model.state_dict().values())
dtypes = sorted({str(p.dtype) for p in model.vlm.parameters() if not p.requires_grad})
print(json.dumps({"growth_mb": peak_mb() - baseline, "baseline_mb": baseline, "frozen_vlm_dtypes": dtypes}))
"""


def test_loading_a_bf16_model_never_holds_a_float32_copy(tmp_path, tiny_sam_file):
    """Peak host memory of a training build and an inference load, in fresh processes.

    A mid-size random Qwen2.5-VL (about 330 M parameters: 0.66 GB in bf16, 1.3 GB in float32)
    is loaded in bf16 the way train_ddp.py builds it and the way inference.py / test.py load it;
    the growth of the peak resident memory over the imports must stay near the bf16 size.
    """
    numel = _write_midsize_segmenter(tmp_path / "segmenter", tiny_sam_file)
    bf16_mb, fp32_mb = numel * 2 / 2**20, numel * 4 / 2**20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    results = {}
    for mode, version in (("train", tmp_path / "segmenter" / "vlm"), ("inference", tmp_path / "segmenter")):
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, mode, str(version), str(tiny_sam_file)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"bf16 {bf16_mb:.0f} MB, fp32 {fp32_mb:.0f} MB, peak growth: "
          + ", ".join(f"{mode} {r['growth_mb']:.0f} MB" for mode, r in results.items()))
    for mode, result in results.items():
        assert result["frozen_vlm_dtypes"] == ["torch.bfloat16"], (mode, result)
        assert result["growth_mb"] < 1.35 * bf16_mb, (mode, result, bf16_mb, fp32_mb)
