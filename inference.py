"""Ask the segmenter about images: interactively, once, or for a whole JSONL file.

Interactive (asks for a request, then an image path; an empty input quits):
    python inference.py --version MODEL_DIR [--vis_save_path vis_output]

One request:
    python inference.py --version MODEL_DIR --image photo.jpg --prompt "Where is the dog?"

A batch ({"image": PATH, "prompt": TEXT} per line -> one JSON answer per line):
    python inference.py --version MODEL_DIR --input_jsonl requests.jsonl --output_jsonl answers.jsonl [--batch_size 8]
Each answer line carries the request's other fields (an "id"...) unchanged; one named like a field
the answer writes (line, text, objects, width, height, image_tokens, downscaled_to, error, input)
is kept in the line's "input" object instead.

JSON answers on stdout (one object per request, one line each; the schema is in the README,
"Boxes: grounding and detection"): per [SEG] its bbox_2d [x1, y1, x2, y2] in pixels of the
original image, label, score, area and COCO-RLE mask:
    python inference.py --version MODEL_DIR --image photo.jpg --prompt "Where is the dog?" --format json

Each answer prints its text, per [SEG] the mask's box, and the image tokens the image became
(--min_pixels / --max_pixels bound them; by default the model's saved limits, at most 1,280
tokens per image; batch lines carry "image_tokens"); the interactive and one-shot modes
save one mask PNG and one overlay PNG per [SEG] into --vis_save_path. MODEL_DIR is a merged
directory from transform_weight.py, a training checkpoint (with --base_model /
--vision_pretrained to override the paths it records) or a run directory (its latest checkpoint;
--pick best: its best).

Exit status: 0 when every request was answered (the interactive loop: whenever it ends); 1 when a
request failed (one-shot: its error is printed; batch: every other line is still answered and
written, and each failed line carries its error in the "error" field of the output file) or the
model could not be loaded; 2 for a command line that cannot work (also a batch file without
requests); 130 when Ctrl-C ended a batch (the lines before it are written, and counted).
"""

import argparse
import sys

from utils.cli import setup_environment, setup_logging

setup_environment()

from utils.inference_cli import (  # noqa: E402
    OUTPUT_FORMATS,
    add_session_arguments,
    check_inference_arguments,
    run_requests,
    session_from_args,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_arguments(parser)
    parser.add_argument("--vis_save_path", default="./vis_output", help="where mask and overlay PNGs go")
    parser.add_argument("--image", help="one-shot: the image (with --prompt)")
    parser.add_argument("--prompt", help="one-shot: the request (with --image)")
    parser.add_argument("--input_jsonl", help='batch: {"image": PATH, "prompt": TEXT} per line (other fields are copied to the answer)')
    parser.add_argument("--output_jsonl", help="batch: where the answers go (default: INPUT.out.jsonl)")
    parser.add_argument("--image_root", help="batch: base of relative image paths (default: the input file's directory)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="batch: requests answered together as one batch (default: 8 on CUDA, 1 on a CPU; on an "
                        "H200, 8 requests of 32 tokens took 0.64 s as one batch against 2.4 s one at a time). A batch "
                        "that fails is answered one request at a time; one that ran out of GPU memory also halves "
                        "the batch size for the lines after it")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="text",
                        help="text: answers for people; json: one JSON object per request on stdout, one line each "
                        "(batch lines are always JSON)")
    parser.add_argument("--no_progress", action="store_true", help="batch: no progress bar")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    check_inference_arguments(args, parser)
    setup_logging(args.verbose)
    session = session_from_args(args, one_request=args.image is not None)
    if args.input_jsonl is None and args.image is None:  # the interactive loop reads the terminal
        take_bytes_that_are_not_utf8()
    return run_requests(session, args, say, say_error, ask_on_stderr if args.format == "json" else input)


def say(text: str) -> None:
    print(text, flush=True)


def say_error(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ask_on_stderr(question: str) -> str:
    """``input`` with its question on stderr (under ``--format json`` stdout carries JSON only)."""
    print(question, end="", file=sys.stderr, flush=True)
    return input()


def take_bytes_that_are_not_utf8() -> None:
    """A strict-UTF-8 stdin (a UTF-8 locale other than C.UTF-8) given other bytes (a Latin-1 file
    name) raises UnicodeDecodeError, and drops whatever else it had read with them (the next lines
    of a piped input). Read them as Python reads file names (surrogateescape: such a path still
    opens; ``check_prompt`` refuses such a request), and print them escaped rather than fail."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "backslashreplace")):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)


if __name__ == "__main__":
    sys.exit(main())
