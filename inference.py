"""Ask the segmenter about images: interactively, once, or for a whole JSONL file.

Interactive (asks for a request, then an image path; an empty input quits):
    python inference.py --version MODEL_DIR [--vis_save_path vis_output]

One request:
    python inference.py --version MODEL_DIR --image photo.jpg --prompt "Where is the dog?"

A batch ({"image": PATH, "prompt": TEXT} per line -> one JSON answer per line):
    python inference.py --version MODEL_DIR --input_jsonl requests.jsonl --output_jsonl answers.jsonl

JSON answers on stdout (one object per request, one line each; the schema is in the README,
"Boxes: grounding and detection"): per [SEG] its bbox_2d [x1, y1, x2, y2] in pixels of the
original image, label, score, area and COCO-RLE mask:
    python inference.py --version MODEL_DIR --image photo.jpg --prompt "Where is the dog?" --format json

Each answer prints its text, per [SEG] the mask's box, and the image tokens the image became
(--min_pixels / --max_pixels bound them; by default the model's saved limits, at most 1,280
tokens per image; batch lines carry "image_tokens"); the interactive and one-shot modes
save one mask PNG and one overlay PNG per [SEG] into --vis_save_path. MODEL_DIR is a merged
directory from transform_weight.py, a training checkpoint (with --base_model /
--vision_pretrained to override the paths it records) or a run directory (its latest checkpoint).

Exit status: 0 when every request was answered (the interactive loop: whenever it ends); 1 when a
request failed (one-shot: its error is printed; batch: every other line is still answered and
written, and each failed line carries its error in the "error" field of the output file) or the
model could not be loaded; 2 for a command line that cannot work.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.inference import (  # noqa: E402
    OUTPUT_FORMATS,
    add_model_arguments,
    check_model_arguments,
    interactive_loop,
    one_shot,
    run_batch,
    session_from_args,
    setup_logging,
)

logger = logging.getLogger("inference")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--vis_save_path", default="./vis_output", help="where mask and overlay PNGs go")
    parser.add_argument("--image", help="one-shot: the image (with --prompt)")
    parser.add_argument("--prompt", help="one-shot: the request (with --image)")
    parser.add_argument("--input_jsonl", help='batch: {"image": PATH, "prompt": TEXT} per line')
    parser.add_argument("--output_jsonl", help="batch: where the answers go (default: INPUT.out.jsonl)")
    parser.add_argument("--image_root", help="batch: base of relative image paths (default: the input file's directory)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="text",
                        help="text: answers for people; json: one JSON object per request on stdout, one line each "
                        "(batch lines are always JSON)")
    parser.add_argument("--no_progress", action="store_true", help="batch: no progress bar")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    check_model_arguments(args, parser)
    one = args.image is not None or args.prompt is not None
    if one and (args.image is None or args.prompt is None):
        parser.error("a one-shot request needs both --image and --prompt")
    if one and args.input_jsonl:
        parser.error("choose a one-shot request (--image/--prompt) or a batch (--input_jsonl), not both")
    # Paths that cannot work are refused here, before the model loads (minutes for a large one).
    if args.input_jsonl:
        if not Path(args.input_jsonl).exists():
            parser.error(f"--input_jsonl {args.input_jsonl} does not exist")
        if not Path(args.input_jsonl).is_file():
            parser.error(f"--input_jsonl {args.input_jsonl} is not a file: name the JSONL file of requests")
        output = args.output_jsonl or str(Path(args.input_jsonl).with_suffix(".out.jsonl"))
        if Path(output).resolve() == Path(args.input_jsonl).resolve():
            parser.error("--output_jsonl must differ from --input_jsonl")
        if Path(output).is_dir():
            parser.error(f"--output_jsonl {output} is a directory: name a file, e.g. {Path(output) / 'answers.jsonl'}")
        if args.image_root and not Path(args.image_root).is_dir():
            parser.error(f"--image_root {args.image_root} is not a directory")
    elif Path(args.vis_save_path).exists() and not Path(args.vis_save_path).is_dir():
        parser.error(f"--vis_save_path {args.vis_save_path} is a file: name a directory for the mask PNGs")
    setup_logging(args.verbose)

    session = session_from_args(args, one_request=one)

    def say(text: str) -> None:
        print(text, flush=True)

    def say_error(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.input_jsonl:
        summary = run_batch(session, args.input_jsonl, output, args.image_root, progress=not args.no_progress)
        print(f"{summary.succeeded} of {summary.total} requests answered, {summary.failed} failed; answers in {output}")
        if summary.failed:  # a script or a cluster job sees it in the exit status
            logger.error('%d of %d requests failed; each one\'s error is in the "error" field of its line in %s',
                         summary.failed, summary.total, output)
            return 1
        return 0
    if one:
        return one_shot(session, args.image, args.prompt, args.vis_save_path, say, say_error, args.format)
    if args.format == "json":  # stdout carries only JSON: the questions and the goodbye go to stderr
        def read(question: str) -> str:
            print(question, end="", file=sys.stderr, flush=True)
            return input()

        answered = interactive_loop(session, args.vis_save_path, say, read, output_format="json")
        say_error(f"bye ({answered} requests answered; files in {args.vis_save_path})")
        return 0
    answered = interactive_loop(session, args.vis_save_path, say)
    print(f"bye ({answered} requests answered; files in {args.vis_save_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
