"""Command-line pieces the entry points share: the flags that choose and load a segmenter, the
image-token flags, and the setup of the process (environment, logging).

Nothing heavy is imported at load time (no torch, no transformers): the entry points parse their
flags before those load, so that ``--help`` and a wrong flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os

from model.constants import DECODING_MODES, PRECISION_NAMES
from model.image_tokens import DEFAULT_MAX_IMAGE_TOKENS, check_pixel_values

#: ``--pick``: which checkpoint of a run directory (see :func:`model.loading.resolve_checkpoint`).
PICKS: tuple[str, ...] = ("latest", "best")

#: Pixels per image-token side (patch size x merge size) of each Qwen-VL generation.
_TOKEN_SIDES = (("Qwen2/2.5-VL", 28), ("Qwen3-VL", 32))


def setup_environment(offline_hub: bool = True) -> None:
    """Environment defaults of an entry point, set before the libraries that read them are
    imported (a value already in the environment wins).

    Tokenizers' own thread pool is turned off: the DataLoader forks its workers after the
    tokenizer ran, which makes tokenizers warn and can deadlock. ``offline_hub``: the Hugging Face
    hub is not asked (huggingface_hub reads ``HF_HUB_OFFLINE`` when imported); training leaves it
    to the environment, as a hub id may have to be downloaded there.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline_hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr; library progress bars off (a batch has its own)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def add_checkpoint_arguments(parser) -> None:
    """``--pick``, ``--base_model``, ``--vision_pretrained``: which checkpoint of a run directory,
    and the base files a training checkpoint's recorded paths are replaced with."""
    parser.add_argument("--pick", choices=PICKS, default="latest",
                        help="in a run directory: which checkpoint (default %(default)s)")
    parser.add_argument("--base_model",
                        help="training checkpoint: its base Qwen-VL, a directory or hub id, instead of the one it records")
    parser.add_argument("--vision_pretrained",
                        help="training checkpoint: the official SAM .pth, instead of the path it records")


def add_model_arguments(parser: argparse.ArgumentParser, *, auto_decoding: str) -> argparse._ArgumentGroup:
    """The "model" group of the entry points that run a segmenter (inference.py, test.py,
    tools/app.py): ``--version``, :func:`add_checkpoint_arguments`, ``--precision``,
    ``--decoding``, ``--compile_sam`` and :func:`add_pixel_arguments`. Returns the group, for the
    entry point's own model flags.

    ``auto_decoding``: what ``--decoding auto`` chooses at this entry point.
    """
    group = parser.add_argument_group("model")
    group.add_argument("--version", required=True,
                       help="merged model directory (transform_weight.py), training checkpoint, or run directory")
    add_checkpoint_arguments(group)
    group.add_argument("--precision", choices=PRECISION_NAMES, default=None,
                       help="weights and compute (default: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--decoding", choices=DECODING_MODES, default="auto",
                       help="compiled: static KV cache + a compiled step (CUDA graphs), compiled once per batch "
                       "shape; eager: the same loop uncompiled; transformers: transformers' generate. All give the "
                       f"same answers. auto: {auto_decoding}")
    group.add_argument("--compile_sam", action=argparse.BooleanOptionalAction, default=None,
                       help="compile SAM's image encoder block by block (torch.compile; the first batch of each size "
                       "pays the compile; eager if compiling fails; same outputs). Default auto: on on CUDA (test.py, "
                       "the interactive loop, batch mode and the app), off on a CPU and for a one-shot inference.py "
                       "question; --no-compile_sam turns it off. On an H200 (SAM ViT-H, bf16): 19.7 against 32.4 ms "
                       "per 1024x1024 image, after 7.6-21 s of compile once per batch size")
    add_pixel_arguments(group)
    return group


def add_pixel_arguments(parser) -> None:
    """``--min_pixels`` / ``--max_pixels`` (Qwen's names) on a parser or argument group."""
    per_token = " or ".join(f"{side}x{side} ({family})" for family, side in _TOKEN_SIDES)
    capped = ", ".join(f"{DEFAULT_MAX_IMAGE_TOKENS * side * side:,} pixels for {family}" for family, side in _TOKEN_SIDES)
    parser.add_argument(
        "--min_pixels", type=int, default=None,
        help="Qwen image processor: smaller images are upscaled to at least this many pixels "
        "(default: the model's saved value)",
    )
    parser.add_argument(
        "--max_pixels", type=int, default=None,
        help=f"Qwen image processor: larger images are downscaled to at most this many pixels; one image token per "
        f"{per_token} pixels (default: the model's saved value, capped at {DEFAULT_MAX_IMAGE_TOKENS:,} tokens: "
        f"{capped})",
    )


def check_pixel_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``parser.error`` naming the flag when ``--min_pixels`` / ``--max_pixels`` are unusable."""
    try:
        check_pixel_values(args.min_pixels, args.max_pixels)
    except ValueError as error:
        parser.error(str(error))
