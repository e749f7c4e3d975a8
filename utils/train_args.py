"""Command-line arguments of train_ddp.py: LISA/VLMSAM names, a config file, checks before loading.

Every boolean can be switched both ways (``--gradient_checkpointing`` / ``--no-gradient_checkpointing``).
``--config FILE.json`` supplies defaults (keys are the flag names); flags on the command line win.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from model.constants import ANSWER_STYLES, CONVERSATION_MODES, MULTI_TURN, PRECISION_NAMES, SEG_STATES
from utils.cli import add_pixel_arguments, check_pixel_arguments

BOOL = argparse.BooleanOptionalAction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the Qwen-VL + SAM reasoning segmenter (python train_ddp.py, or under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="JSON file of flag values (command-line flags override it)")
    model = p.add_argument_group("model")
    model.add_argument("--version", help="Qwen-VL model directory (or hub id), or a segmenter directory")
    model.add_argument("--vision_pretrained", help="official SAM checkpoint (e.g. weights/sam_vit_h_4b8939.pth)")
    model.add_argument("--vision_model", default=None, help="SAM variant (vit_b/vit_l/vit_h/tiny); default: read from the file")
    model.add_argument("--lora_r", type=int, default=8)
    model.add_argument("--lora_alpha", type=int, default=16)
    model.add_argument("--lora_dropout", type=float, default=0.05)
    model.add_argument("--lora_target_modules", default="q_proj,v_proj", help="comma-separated language-model linear layers (all-linear: all of them, q_proj ... down_proj)")
    model.add_argument("--train_language_model", action=BOOL, default=False, help="train the whole language model instead of LoRA (small models)")
    model.add_argument("--gradient_checkpointing", action=BOOL, default=False, help="recompute the VLM's activations in backward")
    model.add_argument("--compile_sam", action=BOOL, default=None, help="compile SAM's image encoder block by block (torch.compile; the first batch of each size pays the compile, 7.6-21 s for ViT-H on an H200; eager if compiling fails; same outputs). Default auto: on on CUDA, off on a CPU; --no-compile_sam turns it off. On an H200 (Qwen2.5-VL-7B + SAM ViT-H, bf16, batch 2): step 0.263 against 0.315 s, peak 25.9 against 27.0 GB")
    model.add_argument("--ce_loss_weight", type=float, default=1.0)
    model.add_argument("--bce_loss_weight", type=float, default=2.0)
    model.add_argument("--dice_loss_weight", type=float, default=0.5)
    model.add_argument(
        "--seg_state", choices=list(SEG_STATES), default=None,
        help="the hidden state that stands for a [SEG]: seg_token, its own; preceding_token, the state that predicts "
        "it (LISA's; the CPU demo's recipe, where the two score alike over three seeds); default: the segmenter "
        "directory's own, seg_token for a new model; recorded in the checkpoint's config.json",
    )
    add_pixel_arguments(model)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_dir", default="./dataset")
    data.add_argument("--dataset", default="sem_seg||refer_seg||vqa||reason_seg")
    data.add_argument("--sample_rates", default="9,3,3,1")
    data.add_argument("--sem_seg_data", default="ade20k||cocostuff||pascal_part||paco_lvis||mapillary")
    data.add_argument("--refer_seg_data", default="refclef||refcoco||refcoco+||refcocog")
    data.add_argument("--vqa_data", default="llava_instruct_150k")
    data.add_argument("--reason_seg_data", default="ReasonSeg|train")
    data.add_argument("--coco_data", default="", help="your own COCO data as 'instances.json|image_dir' (add 'coco' to --dataset)")
    data.add_argument("--explanatory", type=float, default=0.1, help="share of ReasonSeg samples answered with an explanation")
    data.add_argument("--num_questions_per_image", type=int, default=3)
    data.add_argument(
        "--answer_style", choices=list(ANSWER_STYLES), default="plain",
        help="how mask answers are worded, in training and validation: plain is LISA's templates ('Sure, [SEG].'), "
        "named names the target before its [SEG] ('Sure, it is the red square [SEG].'), so that the [SEG] state "
        "must carry the question (helps small models learn to use it); recorded in the checkpoint's config.json, "
        "test.py scores with the recorded style",
    )
    data.add_argument(
        "--conversation_mode", choices=CONVERSATION_MODES, default=MULTI_TURN,
        help="the questions of a sample (one image): multi_turn asks them as the turns of one conversation "
        "(scored better on the demo), single_turn each as its own conversation (LISA's way, and how evaluation "
        "asks them); the image is encoded once either way, and VQA dialogues stay one conversation",
    )
    data.add_argument("--val_dataset", default="ReasonSeg|val")
    data.add_argument(
        "--reason_seg_queries", choices=["first", "all"], default="first",
        help="ReasonSeg validation: score the first query of each image (LISA's protocol, as test.py by default) "
        "or every query",
    )
    data.add_argument("--max_val_samples", type=int, default=0, help="score only the first N validation samples (0: all)")
    data.add_argument("--val_batch_size", type=int, default=1,
                      help="validation batch per process (1, as test.py: the same numbers it prints)")
    data.add_argument("--workers", type=int, default=4)
    data.add_argument(
        "--sam_feature_cache", type=int, default=0, metavar="IMAGES",
        help="keep the frozen SAM encoder's output for up to this many images per process, so that a "
        "picture seen again (another epoch, another source) is not encoded again; exact, it costs memory: "
        "2 MB per image for SAM ViT-B/L/H in bf16, 256 KB for the tiny demo model (0: off)",
    )
    data.add_argument("--max_skipped_share", type=float, default=0.1, help="abort when more than this share of samples is unreadable")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--steps_per_epoch", type=int, default=500)
    optim.add_argument("--batch_size", type=int, default=2, help="per device")
    optim.add_argument("--grad_accumulation_steps", type=int, default=10)
    optim.add_argument(
        "--effective_batch_size", type=int, default=0,
        help="keep batch_size x accumulation x world size at this value by adjusting the accumulation (0: off)",
    )
    optim.add_argument("--lr", type=float, default=3e-4)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.95)
    optim.add_argument("--warmup_steps", type=int, default=100)
    optim.add_argument("--lr_schedule", choices=["linear", "cosine", "constant"], default="linear")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: off)")
    optim.add_argument(
        "--precision", choices=PRECISION_NAMES, default="bf16",
        help="autocast on CUDA (fp16 with dynamic loss scaling); CPU runs fp32 and refuses fp16",
    )
    optim.add_argument("--max_nonfinite_steps", type=int, default=10, help="stop after this many non-finite losses in a row")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--deepspeed", default=None, help="DeepSpeed ZeRO config JSON (instead of plain DDP)")
    run = p.add_argument_group("run")
    run.add_argument("--log_base_dir", default="./runs")
    run.add_argument("--exp_name", default="lisa-qwen")
    run.add_argument("--log_steps", type=int, default=10)
    run.add_argument("--eval_steps", type=int, default=500, help="validate every N steps (and at the end; 0: only at the end)")
    run.add_argument(
        "--save_steps", type=int, default=500,
        help="checkpoint every N steps, and after each validation, at the end and on SIGTERM / SIGINT (0: only then)",
    )
    run.add_argument("--save_total_limit", type=int, default=3, help="keep the last N checkpoints (plus the best)")
    run.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    run.add_argument("--auto_resume", action=BOOL, default=False, help="continue from the run's latest checkpoint if any")
    run.add_argument("--eval_only", action=BOOL, default=False, help="only validate, then exit")
    run.add_argument("--no_eval", action=BOOL, default=False, help="never validate")
    run.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps in total (0: epochs x steps_per_epoch)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags over an optional JSON config file and check them before anything loads."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        config_file = Path(first.config)
        if not config_file.is_file():
            parser.error(f"--config {config_file}: file not found")
        try:
            values = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            parser.error(f"--config {config_file}: not valid JSON ({error})")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {config_file}: unknown keys {unknown}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fail before any model loads, naming the flag and what would fix it."""
    if not args.version:
        parser.error("--version is required: a Qwen-VL model directory (see weights/README.md) or a segmenter directory")
    from model.config import SegmenterConfig

    version_is_segmenter = Path(args.version).is_dir() and SegmenterConfig.is_segmenter_directory(args.version)
    if Path(args.version).exists() is False and ("/" not in args.version or args.version.startswith((".", "/"))):
        parser.error(f"--version {args.version}: directory not found (download the model into weights/, see weights/README.md)")
    if not version_is_segmenter and not args.vision_pretrained and not args.resume and not _auto_resumes(args):
        parser.error("--vision_pretrained is required with a plain Qwen-VL --version: the official SAM file, e.g. weights/sam_vit_h_4b8939.pth")
    if args.vision_pretrained and not Path(args.vision_pretrained).is_file():
        parser.error(f"--vision_pretrained {args.vision_pretrained}: file not found (see weights/README.md for the download links)")
    for flag in ("batch_size", "grad_accumulation_steps", "epochs", "steps_per_epoch", "val_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("save_steps", "eval_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be at least 0 (0: only at the end), got {getattr(args, flag)}")
    if args.effective_batch_size < 0:
        parser.error("--effective_batch_size must be >= 0")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    check_pixel_arguments(args, parser)
    if not args.no_eval and not args.val_dataset:
        parser.error("--val_dataset is empty: name a split (e.g. 'ReasonSeg|val') or pass --no_eval")
    if args.resume and not Path(args.resume).is_dir():
        parser.error(f"--resume {args.resume}: checkpoint directory not found")
    precision_error = _precision_problem(args.precision)
    if precision_error and not args.eval_only:
        parser.error(precision_error)
    if args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed {args.deepspeed}: config file not found (one ships as configs/ds_zero2.json)")
    if args.deepspeed:
        deepspeed_error = _deepspeed_problem(args.deepspeed, args.precision)
        if deepspeed_error:
            parser.error(deepspeed_error)
    if not Path(args.dataset_dir).is_dir() and not args.eval_only:
        parser.error(f"--dataset_dir {args.dataset_dir}: directory not found (see dataset/README.md, or make one with tools/make_synthetic.py)")


def _auto_resumes(args: argparse.Namespace) -> bool:
    """Whether ``--auto_resume`` finds a checkpoint to continue from (which names its SAM file)."""
    from utils.checkpoint import latest_checkpoint

    return args.auto_resume and latest_checkpoint(Path(args.log_base_dir) / args.exp_name) is not None


def _precision_problem(precision: str) -> str | None:
    """Why ``--precision`` cannot train on this machine (train_ddp.py uses CUDA when it is there)."""
    import torch

    from utils.mixed_precision import precision_problem

    return precision_problem(precision, "cuda" if torch.cuda.is_available() else "cpu")


def _deepspeed_problem(path: str, precision: str) -> str | None:
    """Why the DeepSpeed config at ``path`` cannot train here (see ``utils.backends.read_deepspeed_config``)."""
    import torch

    from utils.backends import read_deepspeed_config

    try:
        read_deepspeed_config(path, torch.device("cuda" if torch.cuda.is_available() else "cpu"), precision)
    except ValueError as error:
        return str(error)
    return None


def accumulation_for(args: argparse.Namespace, world_size: int) -> int:
    """Gradient accumulation steps; with --effective_batch_size, chosen to keep that batch."""
    if not args.effective_batch_size:
        return args.grad_accumulation_steps
    per_step = args.batch_size * world_size
    if args.effective_batch_size % per_step:
        raise SystemExit(
            f"--effective_batch_size {args.effective_batch_size} is not a multiple of --batch_size "
            f"{args.batch_size} x {world_size} processes; choose a batch size that divides it"
        )
    return args.effective_batch_size // per_step


# Flags that change what the weights are: a checkpoint trained with other values cannot resume.
# (--min_pixels / --max_pixels are not among them: a resumed run keeps the values its checkpoint's
# processor saved unless they are given again, and one given with another value is logged.)
STRUCTURE_FLAGS = ("lora_r", "lora_alpha", "lora_target_modules", "train_language_model")


def check_resume_compatible(saved: dict, args: argparse.Namespace, checkpoint: str | os.PathLike) -> None:
    """Stop with a clear message when ``checkpoint`` was trained with another model structure."""
    mismatches = [
        f"--{flag} is {getattr(args, flag)!r} here but {saved[flag]!r} in the checkpoint"
        for flag in STRUCTURE_FLAGS
        if flag in saved and saved[flag] != getattr(args, flag)
    ]
    if mismatches:
        raise SystemExit(
            f"cannot resume from {checkpoint}: " + "; ".join(mismatches)
            + ". Use the checkpoint's values or start a new --exp_name."
        )
