"""The Gradio demo's page and request handler (``tools/app.py`` launches it).

One request: an image and a sentence in; the image with the masks and their boxes drawn, the
answer text, the boxes (with labels and scores), a status line ("2 masks; 551 image tokens" /
"no mask...") and the whole answer as a JSON file to download (the schema of
``utils.grounding``, as ``inference.py --format json`` prints it) out. Problems with the input
(no image, an unreadable or oversized file, an empty request) are shown to the person as a
message in the page (``gr.Error``); anything unexpected is logged with its traceback on the
server and shown as a short message. The model answers one request at a time (a queue holds the
others), so concurrent users wait instead of colliding. A request's files (upload, overlay, JSON)
are deleted once they are ``cache_max_age`` seconds old, so a public demo's disk does not fill up.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from utils.inference import NO_MASK_MESSAGE, InferenceSession, InputError, render_overlay

logger = logging.getLogger(__name__)

API_NAME = "segment"

# Example requests for the bundled photographs (tools/examples/).
EXAMPLE_PROMPTS = {
    "car_speed.jpg": "Where can the driver see the car speed in this image? Please output segmentation mask.",
    "dog.jpg": "Can you segment the dog in this image?",
    "dog_with_horn.jpg": "What is unusual about this dog? Please output segmentation mask.",
    "groceries.jpg": "Which item would you use to make a salad? Please output segmentation mask.",
    "truck.jpg": "Segment the part of the truck that touches the road.",
}

DESCRIPTION = """\
Ask for something in an image in plain words; the model answers in text and draws one mask
(with its box) for each thing it points at. Model: `{model}`."""


def examples_in(directory: str | Path) -> list[list[str]]:
    """[image path, request] pairs for the bundled example photographs."""
    directory = Path(directory)
    pairs = []
    for name, prompt in EXAMPLE_PROMPTS.items():
        if (directory / name).is_file():
            pairs.append([str(directory / name), prompt])
    return pairs


def _image_path(image: Any, allowed_dirs: Sequence[Path] | None = None) -> tuple[str, str]:
    """(path on the server, name the person knows) of the uploaded image payload.

    ``allowed_dirs``: the folders a payload's path may lie in (the uploads, the examples).
    Gradio checks only payloads that say they are files, and the handler reads the path itself
    (``preprocess=False``): without this any file of the server could be asked for.
    """
    if isinstance(image, dict):
        path = image.get("path")
        name = image.get("orig_name") or (Path(path).name if path else "the image")
    else:
        path = image
        name = Path(image).name if image else "the image"
    if not path:
        raise InputError("no image: upload a photograph first")
    if allowed_dirs is not None:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(Path(folder).resolve()) for folder in allowed_dirs):
            raise InputError(f"{name} was not uploaded: upload the photograph")
    return str(path), str(name)


_JSON_DIR: Path | None = None


def _answers_dir() -> Path:
    """The folder for answers written outside the Gradio app (removed when the process exits)."""
    global _JSON_DIR
    if _JSON_DIR is None:
        _JSON_DIR = Path(tempfile.mkdtemp(prefix="reasonseg_answers_"))
        atexit.register(shutil.rmtree, _JSON_DIR, ignore_errors=True)
    return _JSON_DIR


def _safe_stem(name: str) -> str:
    """A file-name stem from the person's upload name that any file system accepts.

    The name is the person's: it can be longer than a file name may be (255 bytes; 200 "é" are
    400), hold spaces, quotes or separators, or be only dots.
    """
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem).strip("._")[:50]
    return stem or "image"


def _json_file(record: dict, name: str, folder: Path | None = None) -> str:
    """Write an answer's JSON for download into ``folder``; returns its path (one file per request).

    ``folder``: None writes into a folder of this process (removed when it exits). A write that
    fails (a full disk) leaves no partial file behind.
    """
    text = json.dumps(record, ensure_ascii=False, indent=1) + "\n"  # before the file exists: may raise
    folder = _answers_dir() if folder is None else folder
    path = folder / f"{_safe_stem(name)}_{uuid.uuid4().hex[:12]}.json"
    with open(path, "x", encoding="utf-8") as file:  # "x": never overwrite another request's answer
        try:
            file.write(text)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return str(path)


def handle_request(session: InferenceSession, image: Any, prompt: Any, allowed_dirs: Sequence[Path] | None = None):
    """The demo's handler, without Gradio: returns (overlay, text, boxes, status, record).

    ``allowed_dirs``: where an image payload's path may lie (see :func:`_image_path`); None: anywhere.

    ``boxes`` lists per ``[SEG]`` its ``bbox_2d``, ``label``, ``score`` and ``area`` (the JSON
    objects without their RLE masks); ``record`` is the whole answer (its ``"image"``: the upload's
    name), which the page offers as a JSON file (:func:`_json_file`).

    Raises:
        InputError: a message for the person (the upload's name, not the server's temp path).
    """
    if image is None:
        raise InputError("no image: upload a photograph first")
    path, name = _image_path(image, allowed_dirs)
    try:
        answer = session.ask(path, prompt)
    except InputError as err:
        raise InputError(str(err).replace(path, name)) from None
    record = answer.record()
    record["image"] = name
    boxes = [{"mask": index, **{k: v for k, v in obj.items() if k != "mask"}} for index, obj in enumerate(record["objects"])]
    count = len(answer.masks)
    status = NO_MASK_MESSAGE if count == 0 else f"{count} mask{'s' if count > 1 else ''}"
    if answer.image.resized_from:
        height, width = answer.image.resized_from
        status += f" (the {width}x{height} image was downscaled to {answer.image.array.shape[1]}x{answer.image.array.shape[0]})"
    if answer.image_tokens is not None:
        status += f"; {answer.image_tokens:,} image tokens"
    return render_overlay(answer), answer.text, boxes, status, record


def _limits_line(session: InferenceSession) -> str:
    """What the model sees of an image: its pixel limits in image tokens ("" when unknown)."""
    from model.image_tokens import pixel_limits

    try:
        limits = pixel_limits(session.model.processor)
    except (AttributeError, ValueError):
        return ""
    return f" Images are resized to at most {limits.max_pixels:,} pixels: up to {limits.max_tokens:,} image tokens each."


def cache_schedule(max_age: int) -> tuple[int, int]:
    """Gradio's ``delete_cache`` (every how many seconds, files older than how many) for ``max_age``.

    A file lives at most ``max_age`` plus one period; a quarter of the age (at most 5 minutes)
    keeps that close to ``max_age`` without scanning the cache all the time.
    """
    if max_age < 1:
        raise ValueError(f"the cache age must be at least 1 second, not {max_age}")
    return min(max(max_age // 4, 1), 300), max_age


def remove_files_older_than(folder: Path, max_age: float) -> None:
    """Delete the files in ``folder`` last written more than ``max_age`` seconds ago. A clean-up
    that cannot run (the folder removed by a temp cleaner, a file it may not delete) is logged,
    never a reason to refuse a request; a missing folder is made again."""
    cutoff = time.time() - max_age
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = list(folder.iterdir())
    except OSError as err:
        logger.warning("cannot clean up the answers in %s: %s", folder, err)
        return
    for path in paths:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:  # Gradio's own clean-up got there first
            pass
        except OSError as err:
            logger.warning("cannot delete the old answer %s: %s", path, err)


def build_demo(
    session: InferenceSession,
    model_name: str,
    examples: list[list[str]],
    queue_size: int = 16,
    cache_max_age: int = 3600,
):
    """The Gradio Blocks page, with its queue (one request at a time, ``queue_size`` waiting).

    Every file of a request (the upload, the overlay PNG, the JSON answer) is deleted once it is
    ``cache_max_age`` seconds old, and all of them when the server stops: without this a public
    demo keeps every upload (up to the size limit each) for good and its disk fills up.
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    upload_folder = Path(get_upload_folder())
    # Uploads (and the examples Gradio copies) live in its upload folder; the examples themselves too.
    allowed_dirs = [upload_folder, *{Path(path).parent for path, _ in examples}]
    # The answers go into Gradio's own cache: it serves them from there without a copy and
    # deletes them on the schedule above; the folder itself goes when the process exits.
    upload_folder.mkdir(parents=True, exist_ok=True)
    json_dir = Path(tempfile.mkdtemp(prefix="answers_", dir=upload_folder))
    atexit.register(shutil.rmtree, json_dir, ignore_errors=True)

    def segment(image, prompt):
        # Gradio deletes only the files it took over: an answer whose request then failed in
        # Gradio (writing the overlay on a full disk) is ours to delete, on the same schedule.
        remove_files_older_than(json_dir, cache_max_age)
        try:
            *shown, record = handle_request(session, image, prompt, allowed_dirs)
            return (*shown, _json_file(record, record["image"], json_dir))
        except InputError as err:
            raise gr.Error(str(err), title="Cannot answer this request") from None
        except Exception as err:  # noqa: BLE001 - the person gets a message, the log the traceback
            logger.exception("request failed")
            raise gr.Error(
                f"the model failed on this request ({type(err).__name__}); the server log has the details",
                title="Something went wrong",
            ) from None

    with gr.Blocks(title="Reasoning segmentation", analytics_enabled=False, delete_cache=cache_schedule(cache_max_age)) as demo:
        gr.Markdown("# Reasoning segmentation\n" + DESCRIPTION.format(model=model_name) + _limits_line(session))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=420)
                prompt = gr.Textbox(label="Request", placeholder="e.g. Where can the driver see the car speed?", lines=2)
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                overlay = gr.Image(label="Masks and boxes", format="png", interactive=False, height=420)
                answer = gr.Textbox(label="Answer", interactive=False)
                status = gr.Textbox(label="Masks", interactive=False)
                boxes = gr.JSON(label="Boxes: bbox_2d [x1, y1, x2, y2] in pixels (x2, y2 exclusive), label, score")
                download = gr.File(label="Answer as JSON (boxes, labels, scores, COCO-RLE masks)")
        if examples:
            gr.Examples(examples=examples, inputs=[image, prompt], label="Examples")
        # preprocess=False: the handler decodes the upload itself, so an unreadable file gets a
        # clear message instead of a failure inside Gradio (uploads are still checked by Gradio).
        common = dict(
            fn=segment,
            inputs=[image, prompt],
            outputs=[overlay, answer, boxes, status, download],
            preprocess=False,
            concurrency_limit=1,
            concurrency_id="model",
        )
        button.click(api_name=API_NAME, **common)
        prompt.submit(api_visibility="undocumented", **common)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo
