#!/usr/bin/env python
"""Parameter report: total and trainable parameters and optimiser memory of a real-size model.

Builds the published Qwen-VL configuration and SAM on the ``meta`` device (no weights, no
download, a few seconds), sets up trainability with the project's own code and prints JSON.

Examples::

    python tools/param_report.py --model qwen2.5-vl-7b --sam vit_h
    python tools/param_report.py --model qwen2.5-vl-7b --sam vit_h --recipe lisa
    python tools/param_report.py --model qwen3-vl-8b --lora_r 16 --lora_target_modules q_proj,k_proj,v_proj,o_proj
    python tools/param_report.py --model qwen2.5-vl-3b --train_language_model
    python tools/param_report.py --all          # markdown table over all models, both recipes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.bench.param_count import RECIPES, VLM_SPECS, count_parameters, markdown_table  # noqa: E402
from model.vlm import LoraSettings, parse_target_modules  # noqa: E402

SAM_CHOICES = ("vit_b", "vit_l", "vit_h", "tiny")


def parse_args(argv=None) -> argparse.Namespace:
    defaults = LoraSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"one of: {', '.join(VLM_SPECS)} (or its hub id)")
    parser.add_argument("--sam", default="vit_h", help=f"SAM variant: {', '.join(SAM_CHOICES)} (default vit_h)")
    parser.add_argument("--recipe", default="ours", choices=RECIPES,
                        help="ours: LoRA + [SEG] rows; lisa: LoRA + whole embed_tokens/lm_head (default ours)")
    parser.add_argument("--lora_r", type=int, default=defaults.r)
    parser.add_argument("--lora_alpha", type=int, default=defaults.alpha)
    parser.add_argument("--lora_dropout", type=float, default=defaults.dropout)
    parser.add_argument("--lora_target_modules", default=",".join(defaults.target_modules),
                        help="comma-separated language-model linear names (default q_proj,v_proj)")
    parser.add_argument("--train_language_model", action="store_true",
                        help="train the whole language model instead of LoRA (ours recipe only)")
    parser.add_argument("--all", action="store_true",
                        help="print a markdown table over all models for both recipes")
    args = parser.parse_args(argv)
    if not args.all and not args.model:
        parser.error(f"--model is required (one of: {', '.join(VLM_SPECS)}), or pass --all")
    if args.lora_r <= 0:
        parser.error("--lora_r must be positive")
    targets = parse_target_modules(args.lora_target_modules)
    if not targets:
        parser.error("--lora_target_modules is empty")
    args.lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    args.parser = parser
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.all:
            print(markdown_table(args.sam, args.lora))
        else:
            report = count_parameters(
                args.model, args.sam, args.recipe, args.lora, train_language_model=args.train_language_model
            )
            print(json.dumps(report, indent=2))
    except ValueError as err:
        args.parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
