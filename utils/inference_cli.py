"""``inference.py``'s three ways of answering (one-shot, the interactive loop, batch JSONL), and
the flags that make an :class:`~utils.inference.InferenceSession` (shared with the Gradio app,
``tools/app.py``). The terminal itself (printing, reading stdin) stays with the entry points: the
functions here take ``say``, ``say_error`` and ``read`` callables.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from utils.cli import add_model_arguments, check_pixel_arguments
from utils.inference import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGE_SIDE,
    Answer,
    InferenceSession,
    InputError,
    check_prompt,
    describe,
    path_exists,
    save_visuals,
)

logger = logging.getLogger(__name__)

OUTPUT_FORMATS: tuple[str, ...] = ("text", "json")
"""``text``: for people (:func:`describe`); ``json``: one JSON object per request on one line
(:meth:`Answer.record`, the schema of :mod:`utils.grounding`)."""


def format_answer(answer: Answer, output_format: str = "text", saved: list[tuple[Path, Path]] | None = None) -> str:
    """An answer as ``output_format`` (see :data:`OUTPUT_FORMATS`)."""
    if output_format == "json":
        return json.dumps(answer.record(), ensure_ascii=False)
    if output_format != "text":
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return describe(answer, saved)


def one_shot(
    session: InferenceSession,
    image: str,
    prompt: str,
    vis_dir: str | os.PathLike,
    say: Callable[[str], None],
    say_error: Callable[[str], None],
    output_format: str = "text",
) -> int:
    """Answer one request, save its files and hand the answer to ``say`` as ``output_format``
    (a bad input's message to ``say_error``). Returns an exit status (0, or 1 on bad input)."""
    try:
        answer = session.ask(image, prompt)
    except InputError as err:
        say_error(f"error: {err}")
        return 1
    saved = save_visuals(answer, vis_dir, answer.image.name)
    say(format_answer(answer, output_format, saved))
    return 0


def interactive_loop(
    session: InferenceSession,
    vis_dir: str | os.PathLike,
    say: Callable[[str], None],
    read: Callable[[str], str] = input,
    output_format: str = "text",
) -> int:
    """Ask for a request, then an image path, answer, repeat; an empty input (or EOF) ends it.

    Answers and messages go to ``say`` (the entry point prints them), answers as
    ``output_format``; in ``json`` a request that fails gives ``{"prompt", "image", "error"}``,
    so every request gives one JSON line.

    Returns:
        the number of requests answered.
    """
    answered = 0
    while True:
        try:
            prompt = read("Request (empty to quit): ").strip()
            if not prompt:
                break
            path = _unquote(read("Image path (empty to quit): ").strip())
            if not path:
                break
        except (EOFError, KeyboardInterrupt):
            break
        except UnicodeDecodeError as err:  # a strict-UTF-8 stdin given other bytes: that line is lost, not the loop
            say(f"error: what was typed is not UTF-8 text ({err.reason} at byte {err.start}); type it again")
            continue
        def fail(message: str) -> None:
            if output_format == "json":
                say(json.dumps({"prompt": prompt, "image": path, "error": message}, ensure_ascii=False))
            else:
                say(f"error: {message}")

        try:
            answer = session.ask(path, prompt)
            answered += 1
            try:
                saved = save_visuals(answer, vis_dir, f"{answer.image.name}_{next_file_number(vis_dir, answer.image.name)}")
            except OSError as err:  # disk full, no permission...: the answer itself is still good
                saved = None
                message = f"the answer's mask files could not be saved in {vis_dir} ({err})"
                if output_format == "json":  # stdout keeps one JSON line per request: the message goes to the log
                    logger.error("%s", message)
                else:
                    say(f"error: {message}")
            say(format_answer(answer, output_format, saved))
        except InputError as err:
            fail(str(err))
        except KeyboardInterrupt:
            if output_format == "json":
                logger.info("interrupted")
            else:
                say("interrupted")
            break
        except Exception as err:  # noqa: BLE001 - report and keep the loop alive
            logger.exception("request failed")
            fail(f"the request failed ({type(err).__name__}: {err})")
    return answered


def next_file_number(vis_dir: str | os.PathLike, name: str) -> int:
    """The number after the highest of the interactive loop's files for image ``name`` in
    ``vis_dir`` (``{name}_{n}_mask_0.png``...; 1 when there is none): a later session goes on
    after an earlier one's files instead of overwriting them."""
    ours = re.compile(re.escape(name) + r"_(\d+)_(?:mask|overlay)_\d+\.png")
    numbers = [int(found.group(1)) for file in Path(vis_dir).glob(f"{glob.escape(name)}_*.png")
               if (found := ours.fullmatch(file.name))]
    return max(numbers, default=0) + 1


def _unquote(text: str) -> str:
    r"""The path a person typed or dragged into a terminal, which quotes it ('/my photo.jpg',
    '/it'\''s.jpg') or escapes it (/my\ photo.jpg, macOS): read as a shell would, unless the
    text as typed names a file (a name may hold quotes or backslashes)."""
    if not text or path_exists(text):
        return text
    try:
        words = shlex.split(text)
    except ValueError:  # unbalanced quotes: not shell syntax, keep it as typed
        return text
    return words[0] if len(words) == 1 else text


BATCH_FIELDS: tuple[str, ...] = (
    "line", "text", "objects", "width", "height", "image_tokens", "downscaled_to", "error", "input",
)
"""What a batch writes on each output line besides the request's own fields; a request field
with one of these names is kept, unchanged, in that line's ``"input"`` object instead."""


@dataclass
class BatchSummary:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


def read_batch_lines(input_jsonl: str | os.PathLike) -> list[tuple[int, bytes]]:
    """The request lines of ``input_jsonl`` as (line number, bytes), blank lines left out.

    Raises:
        InputError: the file is missing, unreadable or holds no request line.
    """
    input_jsonl = Path(input_jsonl)
    try:
        data = input_jsonl.read_bytes()
    except FileNotFoundError as err:
        raise InputError(f"input file {input_jsonl} does not exist") from err
    except OSError as err:
        raise InputError(f"input file {input_jsonl} cannot be read ({err.strerror or err})") from err
    # Split on "\n" alone (str.splitlines would also split inside a prompt holding U+2028), and
    # decode each line apart: one line that is not UTF-8 is that line's error, not the batch's.
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    requests = [(number, line.rstrip(b"\r")) for number, line in enumerate(lines, 1) if line.strip()]
    if not requests:
        raise InputError(f'input file {input_jsonl} has no requests: write one {{"image": PATH, "prompt": TEXT}} per line')
    return requests


GPU_BATCH_SIZE = 8
"""``inference.py --batch_size``'s default on CUDA: on one H200 (Qwen2.5-VL-7B + SAM ViT-H, bf16,
2026-11-30) 8 requests of 32 tokens took 0.635 s as one batch against 2.43 s one at a time."""


def resolve_batch_size(flag: int | None, device) -> int:
    """``--batch_size``: the flag when given, else :data:`GPU_BATCH_SIZE` on CUDA and 1 elsewhere (a
    CPU gains nothing from batching: its arithmetic, not its launches, is the cost)."""
    import torch

    if flag is not None:
        return flag
    return GPU_BATCH_SIZE if torch.device(device).type == "cuda" else 1


def run_batch(
    session: InferenceSession,
    input_jsonl: str | os.PathLike,
    output_jsonl: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> BatchSummary:
    """Answer every ``{"image": PATH, "prompt": TEXT}`` line of ``input_jsonl``.

    Writes one output line per input line (same order): ``line``, every field of the request
    (``image``, ``prompt``, and any other, such as an ``id``, unchanged), the answer's JSON
    (:meth:`Answer.record`: ``text``, ``objects`` with ``bbox_2d``, ``label``, ``score``, ``area``
    and the COCO-RLE ``mask``, ``width``, ``height``, ``image_tokens``...) and ``error`` (null, or
    why that line failed). A request field named like one of :data:`BATCH_FIELDS` is moved into
    the line's ``input`` object. A failed line does not stop the batch; Ctrl-C does, after the
    lines already written (``interrupted`` in the summary). Relative image paths are read from
    ``image_root`` (default: the directory of ``input_jsonl``).

    ``batch_size``: consecutive requests answered as one batch (:meth:`InferenceSession.ask_batch`);
    should the batch fail as a whole, its requests are answered one at a time, so that each error
    is its own line's. A batch that ran out of GPU memory also halves the batch size for the lines
    after it (logged), so that a card too small for the default does not fail every batch.

    Raises:
        InputError: see :func:`read_batch_lines`.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    requests = read_batch_lines(input_jsonl)
    output_jsonl = Path(output_jsonl)
    root = Path(image_root) if image_root else Path(input_jsonl).parent
    output_jsonl.parent.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(total=len(requests))
    with output_jsonl.open("w", encoding="utf-8") as out, tqdm(
        total=len(requests), desc="segmenting", unit="request", disable=not progress
    ) as bar:
        try:
            start = 0
            while start < len(requests):
                records, pending = [], []
                for number, line in requests[start : start + batch_size]:
                    record: dict[str, Any] = {"line": number}
                    records.append(record)
                    try:
                        fields = _parse_object(line, number)
                        record.update(_carried(fields))
                        request = _check_request(fields, number)
                        path = Path(request["image"]).expanduser()
                        pending.append((record, session.load(path if path.is_absolute() else root / path),
                                        check_prompt(request["prompt"])))
                    except Exception as err:  # noqa: BLE001 - one bad line must not stop the batch
                        record["error"] = err
                start += batch_size
                answers, out_of_memory = _answer_together(session, pending)
                if out_of_memory and batch_size > 1:
                    batch_size = max(1, len(pending) // 2)
                    logger.warning("a batch of %d requests ran out of GPU memory; answering the next lines in "
                                   "batches of %d (--batch_size sets it)", len(pending), batch_size)
                for (record, _, _), answer in zip(pending, answers):
                    if isinstance(answer, Exception):
                        record["error"] = answer
                    else:
                        record.update(answer.record())
                        record["error"] = None
                # The lines of a batch are written once it is answered: Ctrl-C loses the whole batch.
                for record in records:
                    _write_line(out, record, summary, bar)
        except KeyboardInterrupt:
            # The lines being answered are not written; those before them are, and the caller reports them.
            summary.interrupted = True
    return summary


def _answer_together(session: InferenceSession, pending: list[tuple[dict, Any, str]]) -> tuple[list, bool]:
    """(per pending request (record, image, prompt), its Answer or the Exception it raised;
    whether the batch as a whole ran out of GPU memory)."""
    import torch

    out_of_memory = False
    if len(pending) > 1:
        try:
            return session.ask_batch([image for _, image, _ in pending], [prompt for _, _, prompt in pending]), False
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: one at a time tells whose fault it is
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
            logger.exception("a batch of %d requests failed; answering them one at a time", len(pending))
    answers: list = []
    for _, image, prompt in pending:
        try:
            answers.append(session.ask(image, prompt))
        except Exception as err:  # noqa: BLE001 - one bad line must not stop the batch
            answers.append(err)
    return answers, out_of_memory


def _write_line(out, record: dict, summary: BatchSummary, bar) -> None:
    """Write one output line, its failure (an exception in ``record["error"]``) told and counted."""
    error = record["error"]
    if error is None:
        summary.succeeded += 1
    else:
        if not isinstance(error, InputError):
            logger.error("line %d failed", record["line"], exc_info=error)
        message = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
        record["error"] = message
        summary.failed += 1
        summary.failures.append(f"line {record['line']}: {message}")
        bar.write(f"line {record['line']}: {message}")
    if "input" in record:  # last, whatever the answer wrote before it
        record["input"] = record.pop("input")
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    bar.update(1)


def _parse_object(line: bytes, number: int) -> dict:
    try:
        request = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"line {number} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise InputError(f"line {number} is not valid JSON ({err.msg})") from err
    if not isinstance(request, dict):
        raise InputError(f'line {number} needs {{"image": PATH, "prompt": TEXT}}')
    return request


def _carried(fields: dict) -> dict:
    """The request's fields as its output line carries them: those whose names the batch writes
    itself (:data:`BATCH_FIELDS`) go, unchanged, into ``"input"``, so that neither overwrites the
    other."""
    carried = {name: value for name, value in fields.items() if name not in BATCH_FIELDS}
    clashing = {name: value for name, value in fields.items() if name in BATCH_FIELDS}
    return {**carried, "input": clashing} if clashing else carried


def _check_request(request: dict, number: int) -> dict:
    if not isinstance(request.get("image"), str):
        raise InputError(f'line {number} needs {{"image": PATH, "prompt": TEXT}}')
    check_prompt(request.get("prompt"))
    return request


# ---------------------------------------------------------------------------------------------
# Command-line wiring of inference.py (the session flags and checks also of tools/app.py)
# ---------------------------------------------------------------------------------------------


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The "model" flags (:func:`utils.cli.add_model_arguments`) and the session's: the device,
    quantisation, and the bounds of a request."""
    group = add_model_arguments(
        parser,
        auto_decoding="compiled on CUDA for the interactive loop, batches and the app, eager on a CPU and for a "
        "one-shot request (which would pay the compile for one answer)",
    )
    group.add_argument("--device", help="default: cuda if available, else cpu")
    group.add_argument("--load_in_4bit", action="store_true", help="4-bit language model (bitsandbytes, CUDA)")
    group.add_argument("--load_in_8bit", action="store_true", help="8-bit language model (bitsandbytes, CUDA)")
    group.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit (default 64)")
    group.add_argument("--max_image_side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                       help=f"longer images are downscaled to this longest side (default {DEFAULT_MAX_IMAGE_SIDE})")
    group.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help=f"larger image files are refused (default {DEFAULT_MAX_IMAGE_PIXELS}; what the model "
                       "sees is bounded by --max_pixels)")
    group.add_argument("--cache_size", type=int, default=8,
                       help="images whose encoded features and prompt prefixes are kept for follow-up questions (default 8)")


def check_session_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``parser.error`` naming the flag for values of :func:`add_session_arguments` that cannot
    work (before the model loads)."""
    check_pixel_arguments(args, parser)
    # A negative --max_image_side would shrink every image to 1x1 pixel without a word.
    for flag, least, meaning in [
        ("max_new_tokens", 1, ""),
        ("max_image_side", 0, " (0: no downscale)"),
        ("max_image_pixels", 1, ""),
        ("cache_size", 0, " (0: no reuse)"),
    ]:
        if getattr(args, flag) < least:
            parser.error(f"--{flag} must be at least {least}{meaning}, got {getattr(args, flag)}")


def check_inference_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """inference.py's checks: :func:`check_session_arguments`, one request mode, and paths that
    can work; fills in the default ``--output_jsonl`` of a batch."""
    check_session_arguments(args, parser)
    one = args.image is not None or args.prompt is not None
    if one and (args.image is None or args.prompt is None):
        parser.error("a one-shot request needs both --image and --prompt")
    if one and args.input_jsonl:
        parser.error("choose a one-shot request (--image/--prompt) or a batch (--input_jsonl), not both")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.batch_size is not None and args.batch_size > 1 and not args.input_jsonl:
        parser.error("--batch_size is for a batch (--input_jsonl): the other modes answer one request at a time")
    # Paths that cannot work are refused here, before the model loads (minutes for a large one).
    if args.input_jsonl:
        if not Path(args.input_jsonl).exists():
            parser.error(f"--input_jsonl {args.input_jsonl} does not exist")
        if not Path(args.input_jsonl).is_file():
            parser.error(f"--input_jsonl {args.input_jsonl} is not a file: name the JSONL file of requests")
        try:
            read_batch_lines(args.input_jsonl)
        except InputError as err:
            parser.error(f"--input_jsonl: {err}")
        output = args.output_jsonl or str(Path(args.input_jsonl).with_suffix(".out.jsonl"))
        if Path(output).resolve() == Path(args.input_jsonl).resolve():
            parser.error("--output_jsonl must differ from --input_jsonl")
        if Path(output).is_dir():
            parser.error(f"--output_jsonl {output} is a directory: name a file, e.g. {Path(output) / 'answers.jsonl'}")
        if args.image_root and not Path(args.image_root).is_dir():
            parser.error(f"--image_root {args.image_root} is not a directory")
        args.output_jsonl = output
    elif Path(args.vis_save_path).exists() and not Path(args.vis_save_path).is_dir():
        parser.error(f"--vis_save_path {args.vis_save_path} is a file: name a directory for the mask PNGs")


def session_from_args(args: argparse.Namespace, one_request: bool = False) -> InferenceSession:
    """Load the model named by ``args``; a loading problem exits with its message (status 1).

    ``one_request``: the process answers one request, so ``--decoding auto`` and an unset
    ``--compile_sam`` do not compile.
    """
    from model.loading import ModelLoadError, load_segmenter
    from model.sam_compile import compile_image_encoder_as_asked

    try:
        model = load_segmenter(
            args.version,
            precision=args.precision,
            device=args.device,
            base_model=args.base_model,
            vision_pretrained=args.vision_pretrained,
            load_in_4bit=args.load_in_4bit,
            load_in_8bit=args.load_in_8bit,
            pick=args.pick,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
        )
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    compile_image_encoder_as_asked(model.sam.image_encoder, args.compile_sam, model.device, one_request=one_request)
    return InferenceSession(
        model,
        max_new_tokens=args.max_new_tokens,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_pixels,
        cache_size=args.cache_size,
        decoding="eager" if one_request and args.decoding == "auto" else args.decoding,
    )


def run_requests(
    session: InferenceSession,
    args: argparse.Namespace,
    say: Callable[[str], None],
    say_error: Callable[[str], None],
    ask: Callable[[str], str],
) -> int:
    """inference.py once the model is loaded: the batch (``--input_jsonl``), the one-shot request
    (``--image`` / ``--prompt``) or the interactive loop that ``args`` name (checked by
    :func:`check_inference_arguments`). Returns the exit status.

    ``say`` writes answers (stdout), ``say_error`` what must not mix with them (stderr), ``ask``
    puts a question and reads the reply (under ``--format json`` its question goes to stderr, so
    that stdout carries JSON only); the entry point owns the terminal.
    """
    if args.input_jsonl:
        summary = run_batch(session, args.input_jsonl, args.output_jsonl, args.image_root,
                            progress=not args.no_progress,
                            batch_size=resolve_batch_size(args.batch_size, session.model.device))
        if summary.interrupted:
            say(f"interrupted after {summary.done} of {summary.total} requests: {summary.succeeded} answered, "
                f"{summary.failed} failed; their answers are in {args.output_jsonl}")
            return 130  # as a shell reports a command ended by Ctrl-C
        say(f"{summary.succeeded} of {summary.total} requests answered, {summary.failed} failed; answers in {args.output_jsonl}")
        if summary.failed:  # a script or a cluster job sees it in the exit status
            # Logged as inference.py's own line, as it always was.
            logging.getLogger("inference").error(
                '%d of %d requests failed; each one\'s error is in the "error" field of its line in %s',
                summary.failed, summary.total, args.output_jsonl,
            )
            return 1
        return 0
    if args.image is not None:
        return one_shot(session, args.image, args.prompt, args.vis_save_path, say, say_error, args.format)
    answered = interactive_loop(session, args.vis_save_path, say, ask, args.format)
    (say_error if args.format == "json" else say)(f"bye ({answered} requests answered; files in {args.vis_save_path})")
    return 0
