"""What test.py writes: the JSON report, the table on stdout, and the saved predictions.

Every number is printed and stored next to the protocol it was measured under (see
``utils.evaluation``), the split, and its counts. Scores are fractions in [0, 1] in the JSON and
percentages in the table (as papers print them).

Saved predictions (``--save_predictions FILE.jsonl``): one line per question, in split order
(split, protocol, sample index, turn), whatever the number of processes. Each line holds the
request, the question, the reference and given/generated answer, every predicted mask as COCO RLE
(pycocotools, with its box), and per scored target the ground truth as RLE (``gt_rle``: pixels
with value 1; ``ignore_rle``: pixels with value 255, or null) with its I, U, IoU and boxes. A file
is self-contained: :func:`rescore_predictions` recomputes every metric from it alone. Questions a
protocol does not score (no-target expressions under teacher forcing) have no line.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from model.constants import EVAL_PROTOCOLS, GENERATE, TEACHER_FORCED
from utils.atomic_files import write_text_atomically
from utils.evaluation import detection_targets, scored_pairs
from utils.masks import IGNORE_LABEL, decode_rle, mask_to_box
from utils.metrics import DetectionMeter, SegmentationMeter

REPORT_VERSION = 1

PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    TEACHER_FORCED: (
        "the reference answer with its [SEG] tokens is given (nothing generated) and the mask of each "
        "[SEG] is scored: LISA's published protocol. No-target expressions (gRefCOCO) are left out "
        "(counts.excluded_no_target): their given answer has no [SEG], so any model would score IoU 1 and "
        "N-acc 1 on them; N-acc and no-target items are scored under the generate protocol only."
    ),
    GENERATE: (
        "each question is asked on its own and the model answers freely (greedy, at most max_new_tokens); "
        "the k-th [SEG] of the answer is scored against the k-th target, a missing [SEG] counts as an "
        "empty mask, extra [SEG] are not scored; a no-target expression is correct when the answer "
        "gives no mask. seg_format_rate = share of answers with the expected number of [SEG]."
    ),
}

METRIC_DESCRIPTIONS: dict[str, str] = {
    "giou": "mean over masks of I / (U + 1e-5), 1.0 when U = 0 (empty target and empty prediction); "
    "prediction = logit > 0; pixels whose ground truth is 255 removed from both (LISA)",
    "ciou": "sum of I over all masks / (sum of U + 1e-10) (LISA)",
    "precision@t": "share of masks with IoU >= t (exact ratio I/U), t = 0.5 ... 0.9",
    "box_iou": "mean IoU of the tight box of the predicted mask vs the tight box of the target "
    "(both empty = 1, one empty = 0)",
    "box_acc@0.5": "share of masks whose box IoU >= 0.5 (referring-expression comprehension Acc@0.5)",
    "n_acc": "among no-target expressions (empty ground truth), the share predicted empty (GRES N-acc); "
    "null when none was scored (always under teacher_forced, which leaves no-target expressions out)",
    "t_acc": "among expressions with a target, the share with a non-empty prediction",
    "groups": "ReasonSeg: short (is_sentence false) and long (is_sentence true) queries; overall = both",
    "count": "masks scored (one per target; one per no-target expression)",
    "detection": "generate only: the boxes of all the masks of an answer (one per [SEG]) against its target boxes "
    "(one per instance the request names; else one per target mask), matched one to one maximising the summed "
    "box IoU (Hungarian; pairs without overlap are not matches); precision@0.5 = true positives / predicted boxes, "
    "recall@0.5 = true positives / target boxes, f1@0.5 = 2 TP / (predicted + target boxes), a true positive being a "
    "matched pair with box IoU >= 0.5, summed over the split (null when the denominator is 0); matched_iou = mean box "
    "IoU of the matched pairs; exact@0.5 = share of answers with F1 = 1 (all targets found, nothing else; an answer "
    "to a no-target request with no box counts): gRefCOCO's GREC Pr@(F1=1, IoU>=0.5)",
    "coco_ap": "generate on a COCO-format split only: COCO AP (IoU 0.50:0.95), AP50 and AP75 of boxes (bbox) and "
    "masks (segm) from pycocotools' COCOeval on the detections file the run wrote (one detection per non-empty mask, "
    "score = mean mask probability inside the mask), over the images every request of which was answered; "
    "an image with an unreadable item is left out (counted in coco_ap.unreadable_images): its unanswered requests "
    "are a data problem, not the model's misses",
}

_COUNT_KEYS = ("items", "questions", "no_target_questions", "excluded_no_target", "unreadable")
_REPORTED_COUNTS = ("unreadable", "questions", "no_target_questions", "excluded_no_target")
_SCORE_ORDER = (
    "count", "giou", "ciou", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8",
    "precision@0.9", "box_iou", "box_acc@0.5", "n_acc", "no_target_count", "t_acc", "target_count",
    "sum_intersection", "sum_union",
)


def _metrics(scores: dict) -> dict:
    skip = set(_COUNT_KEYS) | {"groups", "answers_with_expected_seg", "seg_format_rate", "detection"}
    ordered = {k: scores[k] for k in _SCORE_ORDER if k in scores}
    ordered.update({k: v for k, v in scores.items() if k not in ordered and k not in skip})
    return ordered


def result_entry(
    split: str, protocol: str, scores: dict, split_items: int, evaluated_items: int, not_scored: str | None = None
) -> dict:
    """One (split, protocol) result of the report from the scores of ``utils.evaluation.evaluate``.

    ``not_scored``: why the protocol scored nothing on the split (``scores`` then holds the counts
    and ``count`` 0 only): the entry says so (``not_scored``) and has no metrics, rather than zeros.
    """
    entry: dict[str, Any] = {
        "split": split,
        "protocol": protocol,
        # Unreadable items are left out of the scores: such a split is not complete either.
        "complete": evaluated_items == split_items and not scores.get("unreadable", 0),
        "counts": {
            "split_items": split_items,
            "evaluated_items": evaluated_items,
            **{key: scores.get(key, 0) for key in _REPORTED_COUNTS},
            "masks": scores["count"],
        },
    }
    if not_scored is not None:
        return {**entry, "not_scored": not_scored, "metrics": {}}
    entry["metrics"] = _metrics(scores)
    if "groups" in scores:
        entry["groups"] = {name: _metrics(group) for name, group in scores["groups"].items()}
    if protocol == GENERATE:
        entry["answers"] = {
            "total": scores["questions"],
            "with_expected_seg": scores["answers_with_expected_seg"],
            "seg_format_rate": scores["seg_format_rate"],
        }
    if "detection" in scores:
        entry["detection"] = scores["detection"]
    return entry


def build_report(model: dict, checkpoint: str, run: dict, results: list[dict]) -> dict:
    """The whole JSON report."""
    protocols = sorted({entry["protocol"] for entry in results}, key=EVAL_PROTOCOLS.index)
    return {
        "report_version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "checkpoint": checkpoint,
        "run": run,
        "protocols": {name: PROTOCOL_DESCRIPTIONS[name] for name in protocols},
        "metric_definitions": METRIC_DESCRIPTIONS,
        "results": results,
    }


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    return write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- the table

_COLUMNS = (
    ("gIoU", "giou"), ("cIoU", "ciou"), ("P@0.5", "precision@0.5"), ("P@0.6", "precision@0.6"),
    ("P@0.7", "precision@0.7"), ("P@0.8", "precision@0.8"), ("P@0.9", "precision@0.9"),
    ("boxIoU", "box_iou"), ("Acc@0.5", "box_acc@0.5"), ("N-acc", "n_acc"), ("T-acc", "t_acc"),
)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _aligned(header: list[str], rows: list[list[str]], left_columns: int) -> str:
    """``header`` and ``rows`` as fixed-width lines: the first ``left_columns`` columns (names)
    left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(results: Iterable[dict]) -> str:
    """A fixed-width table: one row per (protocol, split, query group), scores in %."""
    header = ["protocol", "split", "queries", "items", "masks", *(name for name, _ in _COLUMNS), "[SEG] ok"]
    rows = []
    for entry in results:
        counts = entry["counts"]
        items = str(counts["evaluated_items"] - counts.get("unreadable", 0))  # the items scored
        if not entry["complete"]:
            items += f"/{counts['split_items']}"
        if "not_scored" in entry:  # the note under the table says why
            rows.append([entry["protocol"], entry["split"], "NOT SCORED*", items, "0", *("-" for _ in _COLUMNS), "-"])
            continue
        seg_ok = _percent(entry["answers"]["seg_format_rate"]) if "answers" in entry else "-"
        excluded = entry["counts"].get("excluded_no_target", 0)
        subsets = [("overall", entry["metrics"])] + list(entry.get("groups", {}).items())
        for name, metrics in subsets:
            row = [entry["protocol"], entry["split"], name, items if name == "overall" else "", str(metrics["count"])]
            row += [_percent(metrics.get(key)) if metrics["count"] else "-" for _, key in _COLUMNS]
            if excluded:  # N-acc: not measured (the note under the table says why)
                row[header.index("N-acc")] = "excl*"
            row.append(seg_ok if name == "overall" else "")
            rows.append(row)
    return _aligned(header, rows, left_columns=3)


_BOX_COLUMNS = (
    ("answers", "answers", False), ("boxes", "predictions", False), ("targets", "targets", False),
    ("boxP@0.5", "precision@0.5", True), ("boxR@0.5", "recall@0.5", True), ("boxF1@0.5", "f1@0.5", True),
    ("matchIoU", "matched_iou", True), ("F1=1", "exact@0.5", True),
)
_AP_COLUMNS = (("boxAP", "bbox", "AP"), ("AP50", "bbox", "AP50"), ("AP75", "bbox", "AP75"),
               ("maskAP", "segm", "AP"), ("mAP50", "segm", "AP50"), ("mAP75", "segm", "AP75"))


def format_box_table(results: Iterable[dict]) -> str:
    """The detection table: one row per split scored under ``generate`` (the only protocol with
    detection scores), and COCO AP on COCO-format splits; "" when no result has them."""
    rows = []
    for entry in results:
        if "detection" not in entry:
            continue
        detection = entry["detection"]
        row = [entry["split"]]
        row += [_percent(detection.get(key)) if pct else str(detection.get(key, "-")) for _, key, pct in _BOX_COLUMNS]
        coco = entry.get("coco_ap") or {}
        row += [_percent(coco[kind][key]) if kind in coco else "-" for _, kind, key in _AP_COLUMNS]
        rows.append(row)
    if not rows:
        return ""
    header = ["split", *(name for name, _, _ in _BOX_COLUMNS), *(name for name, _, _ in _AP_COLUMNS)]
    return _aligned(header, rows, left_columns=1)


def format_summary(report: dict) -> str:
    """The table with what it measures: model, protocols, units, and partial splits flagged."""
    results = report["results"]
    lines = [
        f"model: {report['checkpoint']} ({report['model'].get('description', '')})",
        "scores in % (the JSON report holds fractions); masks = scored masks; items marked N/M = first N of M",
        format_table(results),
    ]
    for entry in results:
        excluded = entry["counts"].get("excluded_no_target", 0)
        if "not_scored" in entry:
            lines.append(f"* {entry['protocol']} {entry['split']}: NOT SCORED, {entry['not_scored']}")
        elif excluded:
            lines.append(
                f"* {entry['protocol']} {entry['split']}: {excluded} no-target expressions left out (their given "
                "answer has no [SEG]: teacher forcing cannot score them); N-acc and no-target items: --protocol generate"
            )
    boxes = format_box_table(results)
    if boxes:
        lines += [
            "boxes (generate): every mask's box as a detection, matched one to one to the target boxes; "
            "P/R/F1 at box IoU 0.5 in %; F1=1 = share of answers with every target found and nothing else; "
            "COCO AP from pycocotools' COCOeval on the saved detections",
            boxes,
        ]
        for entry in results:
            coco = entry.get("coco_ap")
            if coco:
                unreadable = coco.get("unreadable_images")
                left_out = f", {unreadable} images with an unreadable item left out" if unreadable else ""
                lines.append(
                    f"  {entry['split']}: COCO AP over {coco['images']} images{left_out}, {coco['detections']} "
                    f"detections ({coco['detections_file']})"
                )
    for name, text in report["protocols"].items():
        lines.append(f"protocol {name}: {text}")
    partial = [f"{e['split']} ({e['protocol']})" for e in results
               if e["counts"]["evaluated_items"] != e["counts"]["split_items"]]
    if partial:
        lines.append("PARTIAL (--max_samples): not comparable with published numbers: " + ", ".join(partial))
    unreadable = [f"{e['split']} ({e['protocol']}): {e['counts']['unreadable']}" for e in results
                  if e["counts"].get("unreadable")]
    if unreadable:
        lines.append("UNREADABLE items left out of the scores (the log names them; not comparable with "
                     "published numbers): " + ", ".join(unreadable))
    return "\n".join(lines)


# --------------------------------------------------------------------------- predictions


class PredictionWriter:
    """Writes prediction records of one rank to ``PATH.rank<R>.part``; :meth:`merge` (rank 0,
    after a barrier) joins all parts into ``PATH`` in split order and removes them. A failed run
    calls :meth:`discard` on every rank, so that no part is left beside ``PATH``. Under torchrun
    on several nodes, ``PATH`` must be on a filesystem every node sees."""

    def __init__(self, path: str | os.PathLike, rank: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.part = self._part(rank)
        self._file = open(self.part, "w", encoding="utf-8")
        self.split_order: list[str] = []

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}.part")

    def sink(self, split: str):
        """A callable for ``evaluate(on_prediction=...)`` that tags records with ``split``."""
        if split not in self.split_order:
            self.split_order.append(split)

        def write(record: dict) -> None:
            self._file.write(json.dumps({"split": split, **record}) + "\n")

        return write

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def discard(self) -> None:
        """Close and remove this rank's part: a failed run's predictions are partial, and the
        part would otherwise stay beside ``PATH`` for good."""
        self.close()
        self.part.unlink(missing_ok=True)

    def merge(self, world_size: int) -> int:
        """Join the parts of every rank into the final file; returns the number of records.

        The parts are removed whether or not the merge succeeds: after the barrier no rank
        writes them any more, and a failed merge leaves no final file (it is written atomically).
        """
        self.close()
        try:
            records = []
            for rank in range(world_size):
                with open(self._part(rank), encoding="utf-8") as handle:
                    records.extend(json.loads(line) for line in handle if line.strip())
            order = {name: i for i, name in enumerate(self.split_order)}
            records.sort(key=lambda r: (order.get(r["split"], len(order)), EVAL_PROTOCOLS.index(r["protocol"]), r["index"], r["turn"]))
            write_text_atomically(self.path, (json.dumps(record) + "\n" for record in records))
        finally:
            for rank in range(world_size):
                self._part(rank).unlink(missing_ok=True)
        return len(records)


def _ground_truth(target: dict) -> np.ndarray:
    gt = decode_rle(target["gt_rle"]).astype(np.uint8)
    if target.get("ignore_rle"):
        gt[decode_rle(target["ignore_rle"])] = IGNORE_LABEL
    return gt


def rescore_predictions(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """Recompute every metric from a saved predictions file alone.

    Returns ``{(split, protocol): scores}`` with the keys of ``utils.metrics.scores_from_state``
    and, when the records carry groups, ``groups`` (name -> scores); ``generate`` results also
    ``detection`` (:func:`utils.metrics.detection_scores_from_state`, from the boxes of the decoded
    masks and the records' ``target_boxes``). The same pairing rule as the evaluation
    (:func:`utils.evaluation.scored_pairs`) is applied to the decoded masks, and, as there, a
    teacher-forced no-target record (written by earlier versions) is not scored.
    """
    meters: dict[tuple[str, str], SegmentationMeter] = {}
    detections: dict[tuple[str, str], DetectionMeter] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            if record["protocol"] == TEACHER_FORCED and record["no_target"]:
                continue
            key = (record["split"], record["protocol"])
            meter = meters.setdefault(key, SegmentationMeter())
            gts = [_ground_truth(t) for t in record["targets"]]
            preds = [decode_rle(m["rle"]) for m in record["pred_masks"]]
            shape = gts[0].shape if gts else (0, 0)
            if record["no_target"]:
                pairs = scored_pairs(preds, [], True, shape, gts[0])
            else:
                pairs = scored_pairs(preds, gts, False, shape)
            for pred, gt in pairs:
                meter.update(pred, gt, group=record.get("groups") or None)
            if record["protocol"] == GENERATE:
                info = {"no_target": record["no_target"], "target_boxes": record.get("target_boxes")}
                detections.setdefault(key, DetectionMeter()).update(
                    [mask_to_box(pred) for pred in preds], detection_targets(info, gts)
                )
    out = {}
    for key, meter in meters.items():
        scores = meter.scores()
        if meter.groups:
            scores["groups"] = {g: meter.scores(g) for g in meter.groups}
        if key in detections:
            scores["detection"] = detections[key].scores()
        out[key] = scores
    return out
