"""Merge a training checkpoint into one standalone model directory.

    python transform_weight.py --ckpt runs/exp/checkpoint-0005000 --out work_dirs/merged
    python transform_weight.py --ckpt runs/exp --out work_dirs/merged          # its latest checkpoint
    python transform_weight.py --ckpt runs/exp --pick best --out work_dirs/merged

The checkpoint (plain DDP or DeepSpeed: the trainer writes the same gathered layout) names its
base Qwen-VL and SAM file; --base_model / --vision_pretrained override those paths when the files
have moved. The LoRA settings are read from the checkpoint; --lora_* flags may restate them and
are reported when they differ (alpha then overrides the scaling; r and the target modules cannot
change). The output holds the merged Qwen-VL (safetensors), the tokenizer and processor with
[SEG], the projection, the mask decoder and SAM: it alone is enough for inference.py, test.py and
tools/app.py, without peft.
"""

import argparse
import sys

from model.constants import PRECISION_NAMES
from utils.cli import add_checkpoint_arguments, setup_environment, setup_logging

setup_environment()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training checkpoint directory, or a run directory with checkpoint-*/")
    parser.add_argument("--out", required=True, help="the standalone directory to write")
    add_checkpoint_arguments(parser)
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="bf16", help="load, merge and save in (default bf16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    lora = parser.add_argument_group("LoRA (read from the checkpoint; only to restate or override)")
    lora.add_argument("--lora_r", type=int)
    lora.add_argument("--lora_alpha", type=float)
    lora.add_argument("--lora_dropout", type=float)
    lora.add_argument("--lora_target_modules", help="comma-separated, e.g. q_proj,v_proj")
    args = parser.parse_args()
    setup_logging()
    # After parsing: torch and transformers take seconds to import, --help and a wrong flag need neither.
    from model.loading import ModelLoadError
    from model.merge import merge_checkpoint
    from model.vlm import parse_target_modules
    from utils.mixed_precision import PRECISIONS

    overrides = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "dropout": args.lora_dropout,
        "target_modules": parse_target_modules(args.lora_target_modules) if args.lora_target_modules else None,
    }
    try:
        out = merge_checkpoint(
            args.ckpt,
            args.out,
            base_model=args.base_model,
            sam_checkpoint=args.vision_pretrained,
            dtype=PRECISIONS[args.precision],
            lora_overrides=overrides,
            pick=args.pick,
            overwrite=args.overwrite,
        )
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
