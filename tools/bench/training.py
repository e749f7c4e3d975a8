"""Training side by side and the training input pipeline.

* :func:`apply_published_training_recipe` -- LoRA with the *whole* ``embed_tokens`` and
  ``lm_head`` trainable (LISA / VLMSAM), against our LoRA with the ``[SEG]`` rows only: a step's
  time and its trainable state, on the tiny model with a 7B-sized vocabulary.
* trainable parameters and AdamW state at real size (counted on the meta device).
* ``train_ddp.py`` under ``torchrun``: 2 processes against 1 (CPU).
* making a 640x480 image and its questions model-ready (a request, a 3-question training sample):
  the image processed once and SAM's resize beside Qwen's, against the same steps in series; and a
  follow-up on an image a FeatureCache holds, against preprocessing and hashing it all again.
* what one data-loader worker does per second on 640x480 JPEGs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from model.batch import SampleEncoder, to_device
from model.segmenter import ReasonSegmenter
from model.vlm import LoraSettings
from utils.distributed import free_port

from .common import (
    GB,
    MB,
    METRICS_FILE,
    QUESTIONS,
    QWEN25_7B_VOCAB,
    QWEN25_MAX_PIXELS,
    QWEN25_MIN_PIXELS,
    REPO,
    BenchRow,
    BenchSettings,
    build_segmenter,
    default_qwen25_processor,
    interleaved,
    median,
    scene,
)


def apply_published_training_recipe(model: ReasonSegmenter, lora: LoraSettings | None = None) -> None:
    """LISA's / VLMSAM's trainable set on our model: LoRA on the same layers, the *whole*
    ``embed_tokens`` and ``lm_head`` matrices, the projection and the whole mask decoder
    (IoU head included). No ``trainable_token_indices``."""
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    model.vlm.requires_grad_(False)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_regex(), bias="none"
    )
    model.vlm = get_peft_model(model.vlm, config)
    for module in (model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()):
        module.weight.requires_grad_(True)
    model.sam.mask_decoder.requires_grad_(True)
    model.config.lora = dict(vars(lora))



def training_batch(model: ReasonSegmenter, seed: int, batch_size: int = 2, turns: int = 3) -> dict:
    """``batch_size`` samples of ``turns`` segmentation questions each (LISA asks 3 per image)."""
    samples = []
    for index in range(batch_size):
        image, _, masks = scene(seed + 100 + index)
        conversation = [(QUESTIONS[(index + t) % len(QUESTIONS)], "Sure, it is [SEG].") for t in range(turns)]
        samples.append(model.prepare(image, conversation, [masks[t % len(masks)] for t in range(turns)]))
    return to_device(model.collate(samples, padding_side="right"), model.device)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the trainable parameters, their gradients and the optimizer's state tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    sizes = {
        "trainable_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
    }
    sizes["total_bytes"] = sizes["param_bytes"] + sizes["grad_bytes"] + sizes["optimizer_state_bytes"]
    return sizes


def train_step(model: ReasonSegmenter, optimizer, batch: dict, autocast_dtype: torch.dtype | None = None) -> float:
    """forward, backward, gradient clipping (1.0), AdamW step, zero_grad -- as utils/trainer.py."""
    model.train()
    context = torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with context:
        output = model(batch)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(output.loss.detach())


def bench_training_step(settings: BenchSettings) -> list[BenchRow]:
    """A training step (batch 2, AdamW) with our trainable set vs LISA's (whole embed/lm_head)."""
    from utils.optim import build_optimizer

    device = settings.torch_device
    vocab_rows = 2048 if settings.smoke else QWEN25_7B_VOCAB
    models = {}
    for side in ("ours", "baseline"):
        model = build_segmenter(settings.hidden_size, settings.num_layers, "tiny", vocab_rows=vocab_rows, seed=settings.seed)
        if side == "ours":
            model.configure_training(LoraSettings())
        else:
            apply_published_training_recipe(model, LoraSettings())
        models[side] = model.to(device)
    batch = training_batch(models["ours"], settings.seed)
    # Same weights, same inputs: the same loss before training (eval mode: no LoRA dropout).
    with torch.no_grad():
        losses = {side: float(m.eval()(batch).loss) for side, m in models.items()}
    loss_diff = abs(losses["ours"] - losses["baseline"])
    optimizers = {side: build_optimizer(m, 3e-4, 0.0, (0.9, 0.95)) for side, m in models.items()}
    times, _ = interleaved(
        {side: (lambda s=side: train_step(models[s], optimizers[s], batch)) for side in models},
        settings.repeats,
        device,
    )
    memory, peaks = {}, {}
    for side, model in models.items():
        # One more step, measured between backward and zero_grad (gradients alive, AdamW state allocated).
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        output = model(batch)
        output.loss.backward()
        optimizers[side].step()
        memory[side] = training_state_bytes(model, optimizers[side])
        optimizers[side].zero_grad(set_to_none=True)
        if device.type == "cuda":
            peaks[side] = torch.cuda.max_memory_allocated(device) - before
    trainable = {side: memory[side]["trainable_params"] for side in memory}
    check_text = (
        f"same weights and batch: loss before training {losses['ours']:.5f} vs {losses['baseline']:.5f} "
        f"(abs diff {loss_diff:.1e})"
    )
    common = dict(
        ours_is="LoRA + [SEG] rows only (peft trainable_token_indices)",
        baseline_is="LoRA + whole embed_tokens and lm_head trainable",
        check=check_text,
        check_passed=loss_diff <= 1e-4 * max(1.0, abs(losses["ours"])),
    )
    if peaks:
        rows_peak = [BenchRow(
            name="training step peak memory increase (torch.cuda.max_memory_allocated)",
            ours=peaks["ours"] / MB, baseline=peaks["baseline"] / MB, unit="MB", goal="report",
            details={"bytes": peaks}, **common,
        )]
    else:
        rows_peak = []
    model_text = (f"tiny Qwen2.5-VL hidden {settings.hidden_size}, {settings.num_layers} layers, "
                  f"{vocab_rows} vocabulary rows; SAM tiny; batch 2 x 3 questions")
    rows = [
        BenchRow(
            name=f"training step (batch 2, AdamW; {vocab_rows}-row embedding and LM head)",
            ours=median(times["ours"]),
            baseline=median(times["baseline"]),
            unit="s",
            goal="report",
            details={"times_ours": times["ours"], "times_baseline": times["baseline"], "model": model_text,
                     "trainable_params": trainable},
            **common,
        ),
        BenchRow(
            name="training state: trainable params + grads + AdamW moments",
            ours=memory["ours"]["total_bytes"] / MB,
            baseline=memory["baseline"]["total_bytes"] / MB,
            unit="MB",
            goal="report",
            details={"bytes": memory, "model": model_text},
            **common,
        ),
    ]
    return rows + rows_peak


def bench_params(settings: BenchSettings, model_name: str = "qwen2.5-vl-7b", sam_variant: str = "vit_h") -> list[BenchRow]:
    """Trainable parameters and AdamW state at real size (tools.bench.param_count, on the meta device)."""
    from .param_count import count_parameters

    ours = count_parameters(model_name, sam_variant, "ours")
    lisa = count_parameters(model_name, sam_variant, "lisa")
    label = f"{ours['hf_id'].split('/')[-1].removesuffix('-Instruct')} + SAM {sam_variant.replace('vit_', 'ViT-').upper().replace('VIT', 'ViT')}"
    common = dict(ours_is="default LoRA (r=8, q_proj/v_proj) + [SEG] rows + projection + mask decoder",
                  baseline_is="LISA's recipe: the same LoRA + whole embed_tokens and lm_head + whole mask decoder",
                  check="counted on the meta device with the project's own set-up code", check_passed=True)
    return [
        BenchRow(
            name=f"trainable parameters, {label}",
            ours=ours["trainable_params"] / 1e6,
            baseline=lisa["trainable_params"] / 1e6,
            unit="M",
            goal="<= 40 M vs about 1.1 B",
            met=ours["trainable_params"] <= 40e6 and 1.0e9 <= lisa["trainable_params"] <= 1.2e9,
            details={"ours": ours["trainable_by_part"], "baseline": lisa["trainable_by_part"]},
            **common,
        ),
        BenchRow(
            name=f"AdamW state (2 fp32 moments), {label}",
            ours=ours["adamw_state_bytes"] / GB,
            baseline=lisa["adamw_state_bytes"] / GB,
            unit="GB",
            goal="report",
            details={"ours_bytes": ours["adamw_state_bytes"], "baseline_bytes": lisa["adamw_state_bytes"]},
            **common,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# DDP throughput (train_ddp.py under torchrun, as subprocesses)
# ---------------------------------------------------------------------------------------------


def ddp_inputs(scratch: Path, hidden_size: int, num_layers: int, num_train: int = 24) -> tuple[Path, Path, dict]:
    """A synthetic data root and a tiny segmenter directory under ``scratch`` (kept for reuse)."""
    from model.tiny import make_tiny_segmenter
    from utils.data.synthetic_writer import MARKER_FILE, write_synthetic_dataset

    data = scratch / "synthetic"
    if (data / MARKER_FILE).is_file():
        marker = json.loads((data / MARKER_FILE).read_text())
    else:
        marker = write_synthetic_dataset(str(data), seed=0, num_train=num_train, num_val=2, overwrite=True)
    model_dir = scratch / f"tiny_h{hidden_size}_l{num_layers}"
    if not (model_dir / "config.json").is_file():
        make_tiny_segmenter(model_dir, "qwen2_5_vl", hidden_size=hidden_size, num_layers=num_layers)
    return data, model_dir, marker["train_flags"]


def run_training(
    nproc: int, data: Path, model_dir: Path, flags: dict, run_dir: Path, steps: int, batch_size: int = 2
) -> list[dict]:
    """``torchrun --nproc_per_node nproc train_ddp.py`` on CPU (1 thread per process, no loader
    workers, no validation); returns the run's training records from metrics.jsonl."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "train_ddp.py", "--version", str(model_dir), "--dataset_dir", str(data),
        *[arg for key, value in flags.items() if key != "val_dataset" for arg in (f"--{key}", value)],
        "--workers", "0", "--batch_size", str(batch_size), "--grad_accumulation_steps", "1",
        "--epochs", "1", "--steps_per_epoch", str(steps), "--max_steps", str(steps), "--warmup_steps", "0",
        "--no_eval", "--save_steps", "1000000", "--log_base_dir", str(run_dir.parent), "--exp_name", run_dir.name,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training run failed ({' '.join(command)}):\n{tail}")
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("kind") == "train"]


def bench_ddp(settings: BenchSettings, scratch: Path) -> list[BenchRow]:
    """Training throughput of the small model, 2 processes vs 1 under torchrun (DDP, gloo, CPU)."""
    steps = 6 if settings.smoke else 12 if settings.quick else 30
    skip = 2 if settings.smoke else 4 if settings.quick else 6
    repeats = 1 if (settings.quick or settings.smoke) else 2
    data, model_dir, flags = ddp_inputs(scratch, settings.hidden_size, settings.num_layers)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for repetition in range(repeats):
        for nproc in ((1, 2) if repetition % 2 == 0 else (2, 1)):
            run_dir = scratch / "runs" / f"ddp_n{nproc}_r{repetition}_{os.getpid()}"
            records = run_training(nproc, data, model_dir, flags, run_dir, steps)
            rates[nproc].extend(r["samples_per_second"] for r in records[skip:])
    sps = {n: median(v) for n, v in rates.items()}
    ratio = sps[2] / sps[1]
    return [
        BenchRow(
            name="training throughput, 2 vs 1 processes (torchrun, 1 thread each)",
            ours=1000.0 / sps[2],
            baseline=1000.0 / sps[1],
            unit="ms/sample",
            goal=">= 1.6x samples per second",
            met=ratio >= 1.6,
            check=f"samples/s: 2 processes {sps[2]:.2f}, 1 process {sps[1]:.2f} (median of steps {skip + 1}-{steps})",
            check_passed=True,
            ours_is="DDP over 2 processes (gloo), samples of both ranks per second",
            baseline_is="1 process",
            details={"samples_per_second": {"1": sps[1], "2": sps[2]}, "steps": steps, "skipped_warmup_steps": skip,
                     "repeats": repeats, "model": f"tiny Qwen2.5-VL hidden {settings.hidden_size}, "
                     f"{settings.num_layers} layers + SAM tiny, default LoRA", "batch_size_per_process": 2,
                     "device": "CPU processes (CUDA_VISIBLE_DEVICES='')"},
        )
    ]


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------


def write_reason_seg_jpegs(root: Path, count: int, width: int = 640, height: int = 480) -> Path:
    """``count`` photo-like JPEGs (quality 90) in ReasonSeg's layout under ``root``."""
    from PIL import Image

    folder = root / "reason_seg" / "ReasonSeg" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image, polygons, _ = scene(1000 + index, width, height)
        Image.fromarray(image).save(folder / f"img_{index:03d}.jpg", quality=90)
        annotation = {
            "text": ["the shape that could roll like a ball", "Which object would you pick up first?",
                     "the largest shape in the picture"],
            "is_sentence": False,
            "shapes": [{"label": "target", "points": polygons[0].tolist()},
                       {"label": "ignore", "points": polygons[-1].tolist()}],
        }
        (folder / f"img_{index:03d}.json").write_text(json.dumps(annotation))
    return root


def bench_data_loading(settings: BenchSettings, scratch: Path) -> list[BenchRow]:
    """Samples per second of what one DataLoader worker does, on 640x480 JPEGs.

    Per sample: ReasonSeg reading (JPEG decode, polygons, 3 questions), the project's
    :class:`SampleEncoder` (Qwen2.5-VL image processor at the project's default limits, SAM
    transform at 1024), and collating into batches of 2 -- in this (the main) process.
    """
    from model.sam import SamTransform
    from model.batch import collate
    from utils.data.reason_seg import ReasonSegDataset

    count = 4 if settings.smoke else 16
    passes = 1 if settings.smoke else 3 if settings.quick else 5
    root = scratch / "jpeg_640x480"
    if not (root / "reason_seg" / "ReasonSeg" / "train" / f"img_{count - 1:03d}.json").is_file():
        write_reason_seg_jpegs(root, count)
    dataset = ReasonSegDataset(str(root), "train", mode="train", explanatory_rate=0.0, text_only_rate=0.0)
    processor = default_qwen25_processor()
    encoder = SampleEncoder(processor, SamTransform(1024))
    pad = processor.tokenizer.pad_token_id

    def one_pass() -> dict:
        samples = [encoder(dataset[i]) for i in range(len(dataset))]
        for start in range(0, len(samples), 2):
            collate(samples[start:start + 2], pad, "right")
        return samples[0]

    times, last = interleaved({"ours": one_pass}, passes, torch.device("cpu"))
    rate = len(dataset) / median(times["ours"])
    sample = last["ours"]
    image_tokens = int(sample["image_grid_thw"].prod()) // 4
    sizes = [p.stat().st_size for p in (root / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg")]
    check_ok = tuple(sample["sam_pixel_values"].shape) == (3, 1024, 1024) and sample["original_size"] == (480, 640)
    return [
        BenchRow(
            name="data loading, one worker, 640x480 JPEGs",
            ours=rate,
            baseline=None,
            unit="samples/s",
            goal=">= 10 per worker",
            met=rate >= 10.0,
            check=f"SAM input {tuple(sample['sam_pixel_values'].shape)}, Qwen grid {sample['image_grid_thw'].tolist()[0]} "
                  f"({image_tokens} image tokens), {len(sample['masks'])} masks per sample",
            check_passed=check_ok,
            ours_is="ReasonSeg reader + SampleEncoder + collate, in the main process",
            details={"seconds_per_pass": times["ours"], "samples_per_pass": len(dataset),
                     "mean_jpeg_bytes": int(np.mean(sizes)), "qwen_pixels": [QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS],
                     "sam_image_size": 1024, "questions_per_sample": 3},
        )
    ]



def bench_preprocessing(settings: BenchSettings) -> list[BenchRow]:
    """CPU time of :func:`model.batch.encode_sample` on a 640x480 photo-like image, at the real
    processors (Qwen2.5-VL's image processor at the project's default limits, SAM at 1024; these
    are independent of the model's size), for a request (1 question) and a training sample (3
    questions asked as 3 conversations, ``--conversation_mode single_turn``).

    Against the same steps in series, as the project did before 2026-11-30: each conversation
    through the processor with its image, then SAM's transform. Checked: the same tokens, labels,
    Qwen pixels and SAM input.
    """
    from model.batch import MULTI_TURN, SINGLE_TURN, encode_sample
    from model.conversation import encode_conversation
    from model.sam import SamTransform

    processor, transform = default_qwen25_processor(), SamTransform(1024)
    image, _, masks = scene(settings.seed + 30)
    repeats = 3 if settings.smoke else 10 if settings.quick else 30
    cases = (
        ("a request, 1 question", [(QUESTIONS[0], None)], MULTI_TURN, []),
        ("a training sample, 3 questions (single_turn)", [(q, "It is [SEG].") for q in QUESTIONS[:3]], SINGLE_TURN,
         [masks[0]] * 3),
    )
    rows = []
    for label, turns, mode, sample_masks in cases:
        groups = [[turn] for turn in turns] if mode == SINGLE_TURN else [turns]

        def ours():
            return encode_sample(processor, transform, image, turns, sample_masks, conversation_mode=mode)

        def in_series():
            return [encode_conversation(processor, image, group) for group in groups], transform.preprocess(image)

        times, last = interleaved({"ours": ours, "baseline": in_series}, repeats, torch.device("cpu"))
        sample, (conversations, sam_input) = last["ours"], last["baseline"]
        same = torch.equal(sample["sam_pixel_values"], sam_input.pixel_values) and all(
            torch.equal(sample[key], conversations[0][key]) for key in ("pixel_values", "image_grid_thw")
        ) and all(
            torch.equal(mine[key], theirs[key]) for mine, theirs in zip(sample["conversations"], conversations)
            for key in mine
        )
        ours_ms, baseline_ms = median(times["ours"]) * 1e3, median(times["baseline"]) * 1e3
        rows.append(
            BenchRow(
                name=f"preprocessing of {label}, 640x480",
                ours=ours_ms,
                baseline=baseline_ms,
                unit="ms",
                goal="faster than in series",
                met=ours_ms < baseline_ms,
                check=("same tokens, labels, Qwen pixels and SAM input" if same else "inputs DIFFER"),
                check_passed=same,
                ours_is="encode_sample: the image processed once, SAM's resize in a thread beside Qwen's",
                baseline_is="each conversation through the processor with its image, then SAM's transform",
                details={"ms_ours": [t * 1e3 for t in times["ours"]], "ms_baseline": [t * 1e3 for t in times["baseline"]],
                         "conversations": len(groups), "qwen_pixels": [QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS],
                         "sam_image_size": 1024},
            )
        )
    rows.append(_bench_follow_up_preprocessing(processor, transform, image, repeats))
    rows.append(_bench_batch_preprocessing(processor, transform, settings.seed, repeats))
    rows.append(_bench_phone_photo(processor, transform, settings, 3 if settings.smoke else 5 if settings.quick else 10))
    return rows


def _bench_phone_photo(processor, transform, settings: BenchSettings, repeats: int) -> BenchRow:
    """A first request about a 4000x3000 JPEG file (a phone photo): decoding it and preprocessing
    it, as an InferenceSession does. Ours decodes it as small as gives the models inputs of the
    same sizes (load_image's ``model_inputs``: the JPEG decoder's 1/2 scale here); the baseline
    decodes every pixel. Checked:
    the same image tokens (Qwen's grid) and SAM input size; how far the pixels moved is reported."""
    from PIL import Image

    from model.batch import image_key, prepare_image
    from utils.inference import ModelInputSizes, load_image

    image, _, _ = scene(settings.seed + 50)
    take = ModelInputSizes.for_processor(processor, transform.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_photo_") as folder:
        path = Path(folder) / "photo.jpg"
        Image.fromarray(image).resize((4000, 3000), Image.BICUBIC).save(path, quality=90)

        def first_request(model_inputs):
            loaded = load_image(path, model_inputs=model_inputs)
            return prepare_image(processor, transform, loaded.array, image_key(processor, transform, loaded.array))

        times, last = interleaved({"ours": lambda: first_request(take), "baseline": lambda: first_request(None)},
                                  repeats, torch.device("cpu"))
    ours, whole = last["ours"], last["baseline"]
    same = torch.equal(ours.fields["image_grid_thw"], whole.fields["image_grid_thw"]) and (
        ours.sam_input.input_size == whole.sam_input.input_size)
    qwen_moved = (ours.fields["pixel_values"].float() - whole.fields["pixel_values"].float()).abs().mean().item()
    sam_moved = (ours.sam_input.pixel_values.float() - whole.sam_input.pixel_values.float()).abs().mean().item()
    ours_ms, baseline_ms = median(times["ours"]) * 1e3, median(times["baseline"]) * 1e3
    return BenchRow(
        name="decoding and preprocessing a 4000x3000 JPEG photo",
        ours=ours_ms,
        baseline=baseline_ms,
        unit="ms",
        goal="faster than decoding every pixel",
        met=ours_ms < baseline_ms,
        check=(f"same image tokens and SAM input size; pixels moved by {qwen_moved:.4f} (Qwen, normalised) and "
               f"{sam_moved:.2f}/255 (SAM) on average" if same else "image tokens or SAM size DIFFER"),
        check_passed=same,
        ours_is="load_image(model_inputs=...): the JPEG decoder's reduced scale that gives both models the same input sizes",
        baseline_is="every pixel decoded",
        details={"ms_ours": [t * 1e3 for t in times["ours"]], "ms_baseline": [t * 1e3 for t in times["baseline"]],
                 "model_inputs": vars(take), "image_grid_thw": ours.fields["image_grid_thw"].tolist(),
                 "qwen_mean_abs_diff": qwen_moved, "sam_mean_abs_diff": sam_moved},
    )


def _same_inputs(mine: dict, theirs: dict) -> bool:
    """Two encoded samples give the models the same inputs: Qwen's image fields, SAM's input and
    every conversation's token fields."""
    return all(torch.equal(mine[key], theirs[key]) for key in ("pixel_values", "image_grid_thw", "sam_pixel_values")) and (
        len(mine["conversations"]) == len(theirs["conversations"])
    ) and all(
        mine_turns.keys() == their_turns.keys() and all(torch.equal(mine_turns[key], their_turns[key]) for key in mine_turns)
        for mine_turns, their_turns in zip(mine["conversations"], theirs["conversations"])
    )


def _bench_batch_preprocessing(processor, transform, seed: int, repeats: int) -> BenchRow:
    """The preprocessing of a batch of 8 requests about 8 different images (``predict([8 images],
    ...)``): on threads (:func:`model.batch.map_in_threads`), against one image after another."""
    from model.batch import encode_sample, map_in_threads, prepare_threads

    images = [scene(seed + 40 + k)[0] for k in range(8)]
    prompts = [QUESTIONS[k % len(QUESTIONS)] for k in range(8)]

    def one(image, prompt):
        return encode_sample(processor, transform, image, [(prompt, None)])

    sides = {"ours": lambda: map_in_threads(one, images, prompts), "baseline": lambda: list(map(one, images, prompts))}
    times, last = interleaved(sides, repeats, torch.device("cpu"))
    same = len(last["ours"]) == len(last["baseline"]) and all(
        _same_inputs(mine, theirs) for mine, theirs in zip(last["ours"], last["baseline"])
    )
    ours_ms, baseline_ms = median(times["ours"]) * 1e3, median(times["baseline"]) * 1e3
    threads = prepare_threads(len(images))
    return BenchRow(
        name="preprocessing of 8 requests about 8 images, 640x480",
        ours=ours_ms,
        baseline=baseline_ms,
        unit="ms",
        goal="faster than one after another",
        met=ours_ms < baseline_ms,
        check=("same tokens, Qwen pixels and SAM input, in order" if same else "inputs DIFFER"),
        check_passed=same,
        ours_is=f"the 8 images on {threads} threads (map_in_threads, as predict does)",
        baseline_is="one image after another",
        details={"ms_ours": [t * 1e3 for t in times["ours"]], "ms_baseline": [t * 1e3 for t in times["baseline"]],
                 "threads": threads, "cpus": os.cpu_count(), "qwen_pixels": [QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS],
                 "sam_image_size": 1024},
    )


def _bench_follow_up_preprocessing(processor, transform, image, repeats: int) -> BenchRow:
    """A follow-up question about an image a FeatureCache has seen: the CPU work before the
    models run. Ours: the image's key (a hash of its pixels), its cached inputs, the question's
    tokens, and the prefix key from the prompt's tokens and the image key. Before 2026-11-30:
    the whole preprocessing again, and the prefix and SAM keys hashed from the model inputs (on a
    GPU, copied back from it first, which this CPU row does not count)."""
    from model.batch import encode_sample, image_key, prepare_image
    from model.image_cache import tensor_key

    question = [("And what is next to it?", None)]
    cached = {}
    key = image_key(processor, transform, image)
    cached[key] = prepare_image(processor, transform, image, key)

    def ours():
        inputs = cached[image_key(processor, transform, image)]
        sample = encode_sample(processor, transform, image, question, image_inputs=inputs)
        tensor_key(sample["conversations"][0]["input_ids"])
        return sample

    def before():
        sample = encode_sample(processor, transform, image, question)
        tensor_key(sample["conversations"][0]["input_ids"], sample["pixel_values"], sample["image_grid_thw"])
        tensor_key(sample["sam_pixel_values"])
        return sample

    times, last = interleaved({"ours": ours, "baseline": before}, repeats, torch.device("cpu"))
    same = _same_inputs(last["ours"], last["baseline"])
    ours_ms, baseline_ms = median(times["ours"]) * 1e3, median(times["baseline"]) * 1e3
    return BenchRow(
        name="preprocessing of a follow-up on a cached image, 640x480",
        ours=ours_ms,
        baseline=baseline_ms,
        unit="ms",
        goal="report",
        check=("same tokens, Qwen pixels and SAM input" if same else "inputs DIFFER"),
        check_passed=same,
        ours_is="the image's key, its cached inputs (FeatureCache), the question's tokens, the prefix key",
        baseline_is="the whole preprocessing again, prefix and SAM keys hashed from the model inputs",
        details={"ms_ours": [t * 1e3 for t in times["ours"]], "ms_baseline": [t * 1e3 for t in times["baseline"]],
                 "conversations": 1, "qwen_pixels": [QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS], "sam_image_size": 1024},
    )
