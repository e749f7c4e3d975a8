"""The demo's two pictures, drawn with matplotlib (Agg): what the model answered, and how it learned.

* :func:`draw_summary` -- a grid of held-out requests chosen by a fixed rule (:func:`select_requests`:
  the first ``count`` questions of the split in split order, not the best ones), each panel showing
  the image, the request, the ground-truth outline, the predicted mask (translucent fill) with its
  box, and the IoU. It reads test.py's ``--save_predictions`` file (see ``utils/eval_report.py``).
* :func:`draw_curve` -- training loss and validation gIoU against the step, from a run's
  ``metrics.jsonl`` (see ``utils/trainer.py``).

Both write a PNG of a fixed pixel size (the figure size times the dpi; nothing is cropped) and
return its path. Used by ``tools/demo.py``; also runnable on its own::

    python tools/demo_figures.py summary demo_out/predictions.jsonl demo_out/summary.png
    python tools/demo_figures.py curve demo_out/runs/demo/metrics.jsonl demo_out/curve.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.masks import decode_rle, overlay_masks  # noqa: E402

logger = logging.getLogger(__name__)

#: Requests in the summary grid, and the protocol they are taken from (the model answers freely).
SUMMARY_COUNT = 8
SUMMARY_PROTOCOL = "generate"
#: Panels per row of the summary grid.
SUMMARY_COLUMNS = 4
#: One summary panel, in pixels (at :data:`DPI`): the request above the image (up to 3 lines),
#: the IoU and the answer below it.
PANEL_WIDTH_PX, PANEL_HEIGHT_PX = 320, 340
PANEL_TITLE_PX, PANEL_LABEL_PX, PANEL_PAD_PX = 50, 40, 8
#: Height of the summary's title and legend rows together, in pixels.
SUMMARY_MARGIN_PX = 70
#: The curve figure, in pixels.
CURVE_SIZE_PX = (800, 560)
DPI = 100

PRED_COLOUR = (240, 50, 230)  # magenta: no synthetic shape has it
GT_OUTER, GT_INNER = "white", "black"


class FigureInputError(ValueError):
    """A predictions or metrics file that cannot be drawn; the message names the file."""


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: str | os.PathLike, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FigureInputError(f"{what} file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FigureInputError(f"{what} file {path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise FigureInputError(f"{what} file {path}, line {number}: expected a JSON object")
            records.append(record)
    return records


_PREDICTION_KEYS = ("split", "protocol", "index", "turn", "image_path", "request", "pred_masks", "targets")


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The records of a ``test.py --save_predictions`` file, checked for the keys the summary needs."""
    records = _read_jsonl(path, "predictions")
    for number, record in enumerate(records, start=1):
        missing = [key for key in _PREDICTION_KEYS if key not in record]
        if missing:
            raise FigureInputError(
                f"predictions file {path}, record {number}: missing {', '.join(missing)} "
                "(expected the lines test.py --save_predictions writes)"
            )
    return records


def select_requests(
    records: Sequence[dict], count: int = SUMMARY_COUNT, protocol: str = SUMMARY_PROTOCOL, split: Optional[str] = None
) -> list[dict]:
    """The fixed rule of the summary: the first ``count`` questions of ``split`` (default: the first
    split of the file) under ``protocol``, in split order (sample index, then turn). Never ranked by
    score, so the grid shows the model as it is."""
    chosen = [r for r in records if r["protocol"] == protocol]
    if split is None and chosen:
        split = chosen[0]["split"]
    chosen = [r for r in chosen if r["split"] == split]
    chosen.sort(key=lambda r: (int(r["index"]), int(r["turn"])))
    return chosen[:count]


def read_metrics(path: str | os.PathLike) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """``(train, val)`` from a run's ``metrics.jsonl``: ``train`` = (step, loss) by step; ``val`` =
    ``"split (protocol)"`` -> (step, gIoU) by step. A step logged twice (a resumed run) keeps its
    last record."""
    train: dict[int, float] = {}
    val: dict[str, dict[int, float]] = {}
    for record in _read_jsonl(path, "metrics"):
        kind = record.get("kind")
        if kind == "train" and record.get("loss") is not None and "step" in record:
            train[int(record["step"])] = float(record["loss"])
        elif kind == "val" and record.get("giou") is not None and "step" in record:
            name = record.get("split", "val")
            if record.get("protocol"):
                name += f" ({record['protocol']})"
            val.setdefault(name, {})[int(record["step"])] = float(record["giou"])
    if not train and not val:
        raise FigureInputError(
            f"metrics file {path} has no training loss and no validation gIoU "
            '(expected lines with "kind": "train" and "loss", or "kind": "val" and "giou")'
        )
    return sorted(train.items()), {name: sorted(points.items()) for name, points in val.items()}


# --------------------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; the demo runs headless
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike, colours: int = 0) -> Path:
    """Render ``fig`` at its exact pixel size and write a PNG (quantised to ``colours`` when > 0)."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if colours:
        image = image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)
    return out


def _image_file(record: dict, image_root: Optional[Path], predictions: Path) -> Path:
    path = Path(record["image_path"] or "")
    candidates = [path] if path.is_absolute() else []
    if image_root is not None:
        candidates.append(image_root / path)
    for candidate in candidates or [path]:
        if candidate.is_file():
            return candidate
    raise FigureInputError(
        f"predictions file {predictions}: image {record['image_path']!r} (sample {record['index']}) not found"
        + (f" (looked under the dataset root {image_root})" if image_root is not None else "")
    )


def _iou_text(record: dict) -> tuple[str, float]:
    ious = [float(t["iou"]) for t in record["targets"] if t.get("iou") is not None]
    if not ious:
        return "not scored", 0.0
    label = "IoU " + " / ".join(f"{iou:.2f}" for iou in ious)
    if record.get("no_target"):
        label += " (no target)"
    return label, float(np.mean(ious))


def _short(text: str, width: int, lines: int) -> str:
    wrapped = textwrap.wrap(" ".join(str(text).split()), width=width, max_lines=lines, placeholder=" ...")
    return "\n".join(wrapped) or "-"


def _panel_masks(record: dict, image: np.ndarray, predictions: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    h, w = image.shape[:2]
    preds = [decode_rle(m["rle"]) for m in record["pred_masks"]]
    gts = [decode_rle(t["gt_rle"]) for t in record["targets"] if t.get("gt_rle")]
    for mask in preds + gts:
        if mask.shape != (h, w):
            raise FigureInputError(
                f"predictions file {predictions}: sample {record['index']} has a {mask.shape} mask "
                f"for a {(h, w)} image ({record['image_path']})"
            )
    return preds, gts


def _middle(text: str, width: int) -> str:
    """``text`` shortened in the middle to at most ``width`` characters."""
    if len(text) <= width:
        return text
    keep = (width - 3) // 2
    return f"{text[:keep]}...{text[len(text) - (width - 3 - keep):]}"


def _draw_panel(fig, box: tuple[float, float, float, float], record: dict, image: np.ndarray,
                predictions: Path) -> float:
    """One request in the pixel box ``(left, top, width, height)`` of the figure (top-down): the
    request above the image, the IoU and the answer below it. Returns the record's mean IoU."""
    left, top, width, height = box
    fig_w, fig_h = fig.get_size_inches() * fig.dpi
    preds, gts = _panel_masks(record, image, predictions)
    image_top, image_height = top + PANEL_TITLE_PX, height - PANEL_TITLE_PX - PANEL_LABEL_PX
    ax = fig.add_axes(((left + PANEL_PAD_PX) / fig_w, 1 - (image_top + image_height) / fig_h,
                       (width - 2 * PANEL_PAD_PX) / fig_w, image_height / fig_h))
    ax.set_anchor("S")  # the image sits on its labels whatever its aspect
    # The predicted masks, filled, each with its tight box (utils.masks draws both).
    shown = overlay_masks(image, preds, alpha=0.5, colors=[PRED_COLOUR], thickness=2) if preds else image
    ax.imshow(shown, interpolation="nearest")
    for gt in gts:  # the ground truth as an outline: white under black dashes, visible on any colour
        if gt.any():
            ax.contour(gt.astype(np.uint8), levels=[0.5], colors=GT_OUTER, linewidths=2.5)
            ax.contour(gt.astype(np.uint8), levels=[0.5], colors=GT_INNER, linewidths=1.2, linestyles="--")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.text((left + PANEL_PAD_PX) / fig_w, 1 - (top + 4) / fig_h, _short(record["request"], 40, 3),
             ha="left", va="top", fontsize=9)
    label, iou = _iou_text(record)
    if not preds:
        label += "  (no mask)"
    answer = _short(f"answer: {record.get('answer', '')!s}", 50, 1)
    fig.text((left + width / 2) / fig_w, 1 - (image_top + image_height + 4) / fig_h, f"{label}\n{answer}",
             ha="center", va="top", fontsize=8.5, color="darkgreen" if round(iou, 2) >= 0.5 else "firebrick")
    return iou


def draw_summary(
    predictions: str | os.PathLike,
    out: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    count: int = SUMMARY_COUNT,
    protocol: str = SUMMARY_PROTOCOL,
    split: Optional[str] = None,
    columns: int = SUMMARY_COLUMNS,
) -> Path:
    """Draw the first ``count`` requests of a predictions file (:func:`select_requests`) as a grid.

    Args:
        predictions: a ``test.py --save_predictions`` JSONL file.
        out: the PNG to write: ``columns`` panels of :data:`PANEL_WIDTH_PX` x
            :data:`PANEL_HEIGHT_PX` per row, plus :data:`SUMMARY_MARGIN_PX` for title and legend.
        image_root: the dataset root, for image paths the records give relative to it
            (absolute paths are used as they are when the file exists).
        count, protocol, split: which requests (see :func:`select_requests`).
        columns: panels per row.

    Raises:
        FigureInputError: a missing or unreadable predictions file, no record of ``protocol``,
            a missing image, or a mask that does not match its image; the message names the file.
    """
    predictions = Path(predictions)
    records = read_predictions(predictions)
    chosen = select_requests(records, count, protocol, split)
    if not chosen:
        found = sorted({f"{r['split']} ({r['protocol']})" for r in records}) or ["nothing"]
        raise FigureInputError(
            f"predictions file {predictions} has no {protocol} record"
            + (f" of split {split}" if split else "") + f"; it holds {', '.join(found)}"
        )
    from PIL import Image

    root = Path(image_root) if image_root is not None else None
    rows = math.ceil(len(chosen) / columns)
    width_px, height_px = columns * PANEL_WIDTH_PX, rows * PANEL_HEIGHT_PX + SUMMARY_MARGIN_PX
    title_px = SUMMARY_MARGIN_PX // 2
    plt = _pyplot()
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    try:
        ious = []
        for number, record in enumerate(chosen):
            with Image.open(_image_file(record, root, predictions)) as handle:
                image = np.asarray(handle.convert("RGB"))
            row, column = divmod(number, columns)
            box = (column * PANEL_WIDTH_PX, title_px + row * PANEL_HEIGHT_PX, PANEL_WIDTH_PX, PANEL_HEIGHT_PX)
            ious.append(_draw_panel(fig, box, record, image, predictions))
        fig.text(
            0.5, 1 - 8 / height_px,
            f"The first {len(chosen)} held-out requests of {_middle(chosen[0]['split'], 48)}, answered freely "
            f"({protocol}), "
            f"not chosen by score: mean IoU {np.mean(ious):.2f}",
            ha="center", va="top", fontsize=11, weight="bold",
        )
        fig.text(
            0.5, 8 / height_px,
            "dashed outline: the ground truth      magenta fill and box: the predicted mask      "
            "IoU: predicted mask vs ground truth (green: at least 0.5)",
            ha="center", va="bottom", fontsize=9,
        )
        path = _save(fig, out, colours=256)
    finally:
        plt.close(fig)
    logger.info("summary of %d held-out requests written to %s", len(chosen), path)
    return path


def _running_mean(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size < window:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    head = cumulative[1:window] / np.arange(1, window)
    return np.concatenate([head, (cumulative[window:] - cumulative[:-window]) / window])


def draw_curve(metrics: str | os.PathLike, out: str | os.PathLike, title: str = "") -> Path:
    """Draw the training loss (raw and a running mean) and the validation gIoU against the step.

    Two panels sharing the step axis, written as a :data:`CURVE_SIZE_PX` PNG to ``out``.

    Raises:
        FigureInputError: a missing or unreadable metrics file, or one with neither a training
            loss nor a validation gIoU; the message names the file.
    """
    metrics = Path(metrics)
    train, val = read_metrics(metrics)
    plt = _pyplot()
    fig, (loss_ax, giou_ax) = plt.subplots(
        2, 1, sharex=True, figsize=(CURVE_SIZE_PX[0] / DPI, CURVE_SIZE_PX[1] / DPI), dpi=DPI,
        gridspec_kw={"height_ratios": [1, 1]},
    )
    try:
        if train:
            steps, losses = zip(*train)
            loss_ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
            window = max(1, len(losses) // 40)
            if window > 1:
                loss_ax.plot(steps, _running_mean(losses, window), color="tab:blue", linewidth=1.8,
                             label=f"running mean ({window} steps)")
            loss_ax.legend(loc="upper right", fontsize=8)
        else:
            loss_ax.text(0.5, 0.5, "no training records", ha="center", va="center", transform=loss_ax.transAxes)
        loss_ax.set_ylabel("training loss")
        loss_ax.grid(alpha=0.3)
        for name, points in val.items():
            steps, gious = zip(*points)
            giou_ax.plot(steps, gious, marker="o", linewidth=1.5, label=name)
            giou_ax.annotate(f"{gious[-1]:.2f}", (steps[-1], gious[-1]), textcoords="offset points",
                             xytext=(4, 4), fontsize=8)
        if val:
            giou_ax.legend(loc="lower right", fontsize=8)
        else:
            giou_ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=giou_ax.transAxes)
        giou_ax.set_ylim(0, 1)
        giou_ax.set_ylabel("validation gIoU (held out)")
        giou_ax.set_xlabel("training step")
        giou_ax.grid(alpha=0.3)
        fig.suptitle(title or f"Training curves ({metrics.parent.name})", fontsize=11)
        fig.subplots_adjust(left=0.09, right=0.97, top=0.93, bottom=0.09, hspace=0.12)
        path = _save(fig, out)
    finally:
        plt.close(fig)
    logger.info("training curves written to %s", path)
    return path


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    summary = sub.add_parser("summary", help="the grid of held-out requests")
    summary.add_argument("predictions", help="test.py --save_predictions file")
    summary.add_argument("out", help="PNG to write")
    summary.add_argument("--dataset_dir", help="dataset root, for relative image paths")
    summary.add_argument("--count", type=int, default=SUMMARY_COUNT)
    summary.add_argument("--protocol", default=SUMMARY_PROTOCOL)
    summary.add_argument("--split", default=None, help="default: the file's first split")
    curve = sub.add_parser("curve", help="training loss and validation gIoU against the step")
    curve.add_argument("metrics", help="a run's metrics.jsonl")
    curve.add_argument("out", help="PNG to write")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.figure == "summary":
            path = draw_summary(args.predictions, args.out, args.dataset_dir, args.count, args.protocol, args.split)
        else:
            path = draw_curve(args.metrics, args.out)
    except FigureInputError as error:
        raise SystemExit(f"error: {error}") from None
    print(path)


if __name__ == "__main__":
    main()
