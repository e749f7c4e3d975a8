"""Evaluation shared by training validation and test.py: sharded over ranks, reduced exactly.

Two protocols, scored by the same code (:class:`SplitScorer`) with the same metrics
(``utils.metrics``):

* ``teacher_forced`` (LISA's published protocol, used by training validation): the reference
  answer with its ``[SEG]`` tokens is fed and the mask of each ``[SEG]`` is scored against its
  ground truth. A no-target expression (gRefCOCO) has a reference answer without ``[SEG]``: fed
  that answer, any model would "predict" no mask (IoU 1, N-acc 1 by construction), so this
  protocol cannot score it. No-target expressions are left out of its scores and counted
  (``excluded_no_target``), and an item whose given answers have no ``[SEG]`` is neither encoded
  nor run through the model; gRefCOCO's N-acc and no-target items are scored under ``generate`` only.
* ``generate``: every question is asked on its own (a left-padded batch of open turns) and the
  model answers freely (greedy, KV cache). The k-th ``[SEG]`` of the answer is scored against the
  k-th target of the question; a missing ``[SEG]`` counts as an empty mask, extra ones are not
  scored. A no-target expression is scored with the union of the answer's masks (empty when it has
  no ``[SEG]``), so it is correct exactly when the answer gives no (non-empty) mask. The share of
  answers with the expected number of ``[SEG]`` is reported (``seg_format_rate``). The boxes of all
  the answer's masks are also scored as detections (``utils.metrics.DetectionMeter``: one-to-one
  matching to the target boxes, precision / recall / F1 at IoU 0.5), and on a COCO-format split
  each mask becomes a COCO results record (``on_detections``) for COCO AP.

Every sample of the split is visited exactly once across ranks (:class:`ShardedEvalSampler`, no
padding), and the metric sums and counters are all-reduced as integers, so 1 and N processes give
identical numbers (for identical per-sample predictions: with ``batch_size`` 1 the forward passes
are the same; larger batches pad differently on different rank counts, which can move a logit by
float rounding).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.batch import SINGLE_TURN, SampleEncoder, encode_sample, row_images, to_device
from model.constants import EVAL_PROTOCOLS, GENERATE, TEACHER_FORCED
from utils.data.sample import SEG_TOKEN, CorruptSampleError
from utils.data.samplers import ShardedEvalSampler
from utils.distributed import ignore_stop_signals
from utils.grounding import coco_results
from utils.masks import IGNORE_LABEL, encode_rle, mask_to_box
from utils.metrics import (
    DetectionMeter,
    SegmentationMeter,
    detection_scores_from_state,
    reduce_state_across_ranks,
    scores_from_state,
)

logger = logging.getLogger(__name__)

#: ReasonSeg's columns: short phrases (``is_sentence`` False) and long queries (True).
QUERY_LENGTH_GROUPS: tuple[str, ...] = ("short", "long")

GroupOf = Callable[[dict], Sequence[str]]
PredictionSink = Callable[[dict], None]
DetectionSink = Callable[[list], None]
UnreadableSink = Callable[[list[int]], None]


def query_length_group(meta: dict) -> list[str]:
    """ReasonSeg's group of a sample: ``long`` for a sentence query, ``short`` for a phrase."""
    return ["long" if meta.get("is_sentence") else "short"]


# --------------------------------------------------------------------------- questions and pairs


def question_infos(turns: Sequence[tuple[str, str]], requests: Sequence[str], meta: dict) -> list[dict]:
    """One dict per turn: what is asked, the reference answer and what it expects.

    Keys: ``turn``, ``question``, ``reference_answer``, ``request``, ``expected_seg`` (the number
    of ``[SEG]`` in the reference answer = the number of target masks), ``no_target``,
    ``no_target_gt`` (the all-zero ground truth of a no-target turn, else None) and
    ``target_boxes`` (the loader's instance boxes of the turn, else None: the detection targets
    are then the boxes of the target masks).
    """
    no_target = list(meta.get("no_target") or [])
    no_target_gts = iter(meta.get("no_target_gt") or [])
    target_boxes = list(meta.get("target_boxes") or [])
    infos = []
    for index, (question, answer) in enumerate(turns):
        is_no_target = bool(no_target[index]) if index < len(no_target) else False
        infos.append(
            {
                "turn": index,
                "question": question,
                "reference_answer": answer,
                "request": requests[index] if index < len(requests) else "",
                "expected_seg": answer.count(SEG_TOKEN),
                "no_target": is_no_target,
                "no_target_gt": next(no_target_gts, None) if is_no_target else None,
                "target_boxes": target_boxes[index] if index < len(target_boxes) else None,
            }
        )
    return infos


def detection_targets(info: dict, gt_masks: Sequence[np.ndarray]) -> list[list[int]]:
    """The target boxes of one question for the detection metrics: none for a no-target
    question; the loader's instance boxes (``info["target_boxes"]``) when it gives them; else
    the tight box of each target mask (ignore pixels are not foreground)."""
    if info.get("no_target"):
        return []
    if info.get("target_boxes"):
        return [list(box) for box in info["target_boxes"]]
    boxes = (mask_to_box(np.asarray(gt)) for gt in gt_masks)
    return [list(box) for box in boxes if box is not None]


def scored_pairs(
    pred_masks: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    no_target: bool,
    image_size: Sequence[int],
    no_target_gt: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (prediction, ground truth) pairs one question adds to the metrics.

    The rule both protocols (and the re-scoring of saved predictions) follow:

    * a question with targets: the k-th predicted mask against the k-th ground truth; a missing
      prediction is an empty mask; predictions beyond the number of targets are not scored;
    * a no-target question: the union of all predicted masks (empty when there is none) against
      the all-zero ground truth (``no_target_gt``, else zeros of ``image_size``).
    """
    height, width = int(image_size[0]), int(image_size[1])
    if no_target:
        gt = no_target_gt if no_target_gt is not None else np.zeros((height, width), np.uint8)
        union = np.zeros(gt.shape, bool)
        for mask in pred_masks:
            union |= np.asarray(mask, dtype=bool)
        return [(union, np.asarray(gt))]
    pairs = []
    for index, gt in enumerate(gt_masks):
        gt = np.asarray(gt)
        pred = np.asarray(pred_masks[index], dtype=bool) if index < len(pred_masks) else np.zeros(gt.shape, bool)
        pairs.append((pred, gt))
    return pairs


def _box(box) -> list[int] | None:
    return None if box is None else [int(v) for v in box]


class NothingScoredError(ValueError):
    """No mask of a split was scored under a protocol (an empty evaluation has no score).

    Raised by :meth:`SplitScorer.result` after the all-reduce, so on every rank alike.
    ``counts``: the split's counters summed over the ranks (``items``, ``questions``,
    ``no_target_questions``, ``excluded_no_target``, ``unreadable`` ...), so that a caller can
    record why, e.g. a split of no-target expressions only under teacher forcing.
    """

    def __init__(self, message: str, counts: dict) -> None:
        super().__init__(message)
        self.counts = dict(counts)


class SplitScorer:
    """Accumulates the metrics and counters of one split under one protocol (one per rank).

    Args:
        groups: group names declared on every rank (e.g. :data:`QUERY_LENGTH_GROUPS`).
        group_of: sample meta -> the groups a question counts towards (besides overall).
        on_prediction: called with one JSON-ready record per question (for saving predictions).
        on_detections: ``generate`` on a COCO-format split (meta ``coco_image_id``): called with
            each answer's COCO results records (:func:`utils.grounding.coco_results`).
    """

    def __init__(
        self,
        protocol: str,
        groups: Iterable[str] = (),
        group_of: GroupOf | None = None,
        on_prediction: PredictionSink | None = None,
        on_detections: DetectionSink | None = None,
    ) -> None:
        if protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.groups = tuple(groups)
        self.group_of = group_of
        self.on_prediction = on_prediction
        self.meter = SegmentationMeter(groups=self.groups)
        # Boxes as detections: generation only (teacher forcing gives away the number of targets).
        self.detection = DetectionMeter() if protocol == GENERATE else None
        self.on_detections = on_detections
        self.counters = {
            "items": 0, "questions": 0, "no_target_questions": 0, "excluded_no_target": 0,
            "answers_with_expected_seg": 0, "unreadable": 0, "interrupted": 0,
        }

    def add_question(
        self,
        extra: dict,
        info: dict,
        pred_masks: Sequence[np.ndarray],
        gt_masks: Sequence[np.ndarray],
        answer: str,
        image_size: Sequence[int],
        pred_scores: Sequence[float | None] | None = None,
    ) -> None:
        """Score one question's predicted masks (bool HxW, in ``[SEG]`` order) against its targets.

        ``pred_scores``: each mask's confidence (``generate``; the detections' scores).

        Under teacher forcing a no-target question is only counted (``excluded_no_target``):
        its given answer has no ``[SEG]``, so it says nothing about the model.
        """
        if self.protocol == TEACHER_FORCED and info["no_target"]:
            self.counters["questions"] += 1
            self.counters["no_target_questions"] += 1
            self.counters["excluded_no_target"] += 1
            return
        meta = extra.get("meta") or {}
        groups = list(self.group_of(meta)) if self.group_of else []
        pairs = scored_pairs(pred_masks, gt_masks, info["no_target"], image_size, info.get("no_target_gt"))
        counts = [self.meter.update(pred, gt, group=groups) for pred, gt in pairs]
        pred_boxes = [mask_to_box(np.asarray(m, bool)) for m in pred_masks]
        target_boxes = detection_targets(info, gt_masks)
        if self.detection is not None:
            self.detection.update(pred_boxes, target_boxes)
        if self.on_detections is not None and "coco_image_id" in meta:
            scores = list(pred_scores) if pred_scores is not None else [None] * len(pred_masks)
            self.on_detections(coco_results(meta["coco_image_id"], meta["coco_category_id"], pred_masks, scores))
        self.counters["questions"] += 1
        self.counters["no_target_questions"] += int(info["no_target"])
        self.counters["answers_with_expected_seg"] += int(len(pred_masks) == info["expected_seg"])
        if self.on_prediction is not None:
            record = self._record(extra, info, pred_masks, pred_boxes, pairs, counts, answer, groups)
            record["target_boxes"] = target_boxes
            if pred_scores is not None:
                for entry, score in zip(record["pred_masks"], pred_scores):
                    entry["score"] = score
            self.on_prediction(record)

    def _record(self, extra, info, pred_masks, pred_boxes, pairs, counts, answer, groups) -> dict:
        targets = []
        for (_, gt), count in zip(pairs, counts):
            ignore = gt == IGNORE_LABEL
            targets.append(
                {
                    "gt_rle": encode_rle(gt == 1),
                    "ignore_rle": encode_rle(ignore) if ignore.any() else None,
                    "intersection": count.intersection,
                    "union": count.union,
                    "iou": count.iou,
                    "pred_box": _box(count.pred_box),
                    "gt_box": _box(count.gt_box),
                    "box_iou": count.box_iou,
                }
            )
        return {
            "protocol": self.protocol,
            "index": int(extra.get("index", -1)),
            "turn": int(info["turn"]),
            "dataset": extra.get("dataset"),
            "image_path": extra.get("image_path"),
            "request": info["request"],
            "question": info["question"],
            "reference_answer": info["reference_answer"],
            "answer": answer,
            "no_target": bool(info["no_target"]),
            "expected_seg": int(info["expected_seg"]),
            "num_seg": len(pred_masks),
            "groups": groups,
            "pred_masks": [{"rle": encode_rle(np.asarray(m, bool)), "box": _box(box)} for m, box in zip(pred_masks, pred_boxes)],
            "targets": targets,
        }

    def result(self, device: torch.device | None = None, description: str = "evaluation") -> dict:
        """All-reduce (exactly) and score. Every rank must call it.

        Returns ``{"interrupted": True, "items": ...}`` when a rank's evaluation was stopped
        (``should_stop`` of :func:`evaluate`); else the keys of
        :func:`utils.metrics.scores_from_state` plus ``items``, ``questions``,
        ``no_target_questions``, ``excluded_no_target`` (no-target questions left out: all of them
        under teacher forcing, none under generation), ``unreadable``; ``groups`` (name -> scores,
        or ``{"count": 0}``) when groups are declared; for ``generate`` also
        ``answers_with_expected_seg``, ``seg_format_rate`` and ``detection`` (the scores of
        :func:`utils.metrics.detection_scores_from_state`).

        Raises:
            NothingScoredError: no mask was scored on any rank (on every rank alike).
        """
        reduce_device = device if device is not None and device.type == "cuda" else None
        state = reduce_state_across_ranks(self.meter.state(), device=reduce_device)
        counters = reduce_state_across_ranks(self.counters, device=reduce_device)
        if counters["interrupted"]:  # a rank stopped early: no score (every rank learns it here)
            return {"interrupted": True, "items": counters["items"]}
        if state["count"] == 0:
            excluded = (
                f", {counters['excluded_no_target']} no-target expressions left out (teacher forcing cannot "
                "score them: use the generate protocol)" if counters["excluded_no_target"] else ""
            )
            raise NothingScoredError(
                f"{description}: no mask was scored ({counters['items']} samples read, "
                f"{counters['unreadable']} unreadable{excluded}): an empty evaluation has no score",
                counters,
            )
        scores = scores_from_state(state)
        scores.update(
            items=counters["items"],
            questions=counters["questions"],
            no_target_questions=counters["no_target_questions"],
            excluded_no_target=counters["excluded_no_target"],
            unreadable=counters["unreadable"],
        )
        if self.groups or any("/" in key for key in state):
            names = sorted({key.split("/", 1)[0] for key in state if "/" in key}, key=_group_order(self.groups))
            scores["groups"] = {
                name: scores_from_state(state, name) if state[f"{name}/count"] else {"count": 0} for name in names
            }
        if self.detection is not None:
            detection = reduce_state_across_ranks(self.detection.state(), device=reduce_device)
            scores["detection"] = detection_scores_from_state(detection)
        if self.protocol == GENERATE:
            scores["answers_with_expected_seg"] = counters["answers_with_expected_seg"]
            scores["seg_format_rate"] = counters["answers_with_expected_seg"] / max(counters["questions"], 1)
        return scores


def _group_order(declared: Sequence[str]):
    return lambda name: (declared.index(name) if name in declared else len(declared), name)


# --------------------------------------------------------------------------- data


class EncodedDataset(Dataset):
    """A raw dataset seen through the sample encoder: every item is a list of encoded samples
    (one). An unreadable item is logged and becomes ``{"unreadable": True, "extra": {"index": ...}}``,
    which the collate function counts and names (``unreadable``). Each question is its own
    conversation (``single_turn``) about the one encoded image.

    ``open_prompts=False``: every question with its reference answer (teacher forcing); ``extra``
    also carries ``index`` and ``turns``. ``open_prompts=True``: every question an open prompt
    (generation); ``extra["rows"]`` has one record per question: ``index``, ``info`` (see
    :func:`question_infos`), ``targets`` (how many of ``masks``, in order, are its targets),
    ``image_path``, ``dataset`` and the item's ``meta``.
    """

    def __init__(self, raw: Dataset, encoder: SampleEncoder, open_prompts: bool = False) -> None:
        self.raw = raw
        self.encoder = encoder
        self.open_prompts = open_prompts

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> list[dict]:
        try:
            raw = self.raw[index]
            if self.open_prompts:
                return [self._open_prompts_sample(raw, index)]
            if not raw.num_seg_tokens:
                return [self._without_forward_sample(raw, index)]
            sample = self.encoder(raw)
            sample["extra"].update(index=index, turns=list(raw.turns))
            return [sample]
        except CorruptSampleError as error:
            logger.warning("evaluation sample %d unreadable, not scored: %s", index, error)
            # Its index travels on: COCO AP leaves out the images of unreadable items (``evaluate``).
            return [{"unreadable": True, "extra": {"index": index}}]

    @staticmethod
    def _without_forward_sample(raw, index: int) -> dict:
        """A teacher-forced item whose given answers have no ``[SEG]`` (e.g. a no-target
        expression): the forward predicts the masks of the given ``[SEG]`` only, so it would
        predict none. Not encoded, and kept out of the model's batch (``without_forward``); its
        questions are still counted (``excluded_no_target`` ...), with what scoring reads."""
        extra = {
            "index": index,
            "turns": list(raw.turns),
            "requests": list(raw.requests),
            "meta": {k: v for k, v in raw.meta.items() if k != "skipped_errors"},
            "image_path": raw.image_path,
            "dataset": raw.dataset,
        }
        return {"without_forward": True, "extra": extra, "original_size": tuple(raw.image.shape[:2])}

    def _open_prompts_sample(self, raw, index: int) -> dict:
        meta = {k: v for k, v in raw.meta.items() if k not in ("skipped_errors", "no_target_gt")}
        infos = question_infos(raw.turns, raw.requests, raw.meta)
        targets = raw.masks_per_turn()
        rows = [
            {"index": index, "info": info, "targets": len(masks), "image_path": raw.image_path,
             "dataset": raw.dataset, "meta": meta}
            for info, masks in zip(infos, targets)
        ]
        return encode_sample(
            self.encoder.processor,
            self.encoder.sam_transform,
            raw.image,
            [(info["question"], None) for info in infos],
            [mask for masks in targets for mask in masks],
            conversation_mode=SINGLE_TURN,
            rows=rows,
        )


def merge_same_images(samples: list[dict]) -> list[dict]:
    """Open-prompt samples of one image file (in a batch) as one sample with all their questions.

    A COCO-format split asks about each category of an image as its own item, so a batch of
    consecutive items holds the same image many times; merged, both encoders run once per image
    (one conversation per question, ``image_index`` mapping rows to images). Samples without an
    image path are kept as they are.
    """
    merged: list[dict] = []
    by_image: dict[tuple, dict] = {}
    for sample in samples:
        path = sample["extra"]["rows"][0]["image_path"]
        key = (path, sample["original_size"])
        target = by_image.get(key) if path else None
        if target is None:
            target = {**sample, "conversations": list(sample["conversations"]), "extra": {"rows": list(sample["extra"]["rows"])}}
            merged.append(target)
            if path:
                by_image[key] = target
            continue
        target["conversations"] += sample["conversations"]
        target["extra"]["rows"] += sample["extra"]["rows"]
        target["masks"] = torch.cat([target["masks"], sample["masks"]])
    return merged


def _collate_present(model, items: list[list[dict]], padding_side: str, merge_images: bool = False) -> dict:
    """One batch of every sample of the readable items.

    The samples that need no forward (see :meth:`EncodedDataset._without_forward_sample`) are
    listed apart, in ``without_forward``; ``batch`` is None when no other sample is left;
    ``unreadable``: the indices of the unreadable items.
    """
    samples = [sample for item in items for sample in item]
    unreadable = [sample["extra"]["index"] for sample in samples if sample.get("unreadable")]
    read = [sample for sample in samples if not sample.get("unreadable")]
    # A gRefCOCO split (or a COCO-format one, which asks about absent categories too) would
    # otherwise pay a forward of the model per no-target expression.
    without_forward = [sample for sample in read if sample.get("without_forward")]
    present = [sample for sample in read if not sample.get("without_forward")]
    if merge_images:
        present = merge_same_images(present)
    batch = model.collate(present, padding_side=padding_side) if present else None
    return {"batch": batch, "without_forward": without_forward, "unreadable": unreadable,
            "items": len(items) - len(unreadable)}


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


# --------------------------------------------------------------------------- the protocols


def _add_teacher_forced_sample(
    scorer: SplitScorer, extra: dict, predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray], image_size
) -> None:
    """Score the questions of one teacher-forced sample: the masks of its given ``[SEG]``, in
    order, against its targets (a question without ``[SEG]`` gets none)."""
    offset = 0
    for info in question_infos(extra["turns"], extra.get("requests") or [], extra.get("meta") or {}):
        count = info["expected_seg"]
        scorer.add_question(
            extra,
            info,
            list(predictions[offset : offset + count]),
            list(targets[offset : offset + count]),
            answer=info["reference_answer"],
            image_size=image_size,
        )
        offset += count


def _score_teacher_forced(model, batch: dict, scorer: SplitScorer) -> None:
    output = model(batch)
    for index, logits in enumerate(output.mask_logits):
        _add_teacher_forced_sample(
            scorer,
            batch["extra"][index],
            (logits > 0).cpu().numpy(),
            batch["masks"][index].cpu().numpy(),
            batch["original_size"][index],
        )


def _score_generated(model, batch: dict, scorer: SplitScorer, max_new_tokens: int = 64, generate_kwargs=None) -> None:
    results = model.generate(batch, max_new_tokens=max_new_tokens, **(generate_kwargs or {}))
    asked = [0] * len(batch["extra"])  # per sample: its questions scored so far, and their targets
    used = [0] * len(batch["extra"])
    for result, sample in zip(results, row_images(batch)):
        row = batch["extra"][sample]["rows"][asked[sample]]
        targets = batch["masks"][sample][used[sample] : used[sample] + row["targets"]]
        asked[sample] += 1
        used[sample] += row["targets"]
        scorer.add_question(
            row,
            row["info"],
            result.masks,
            list(targets.cpu().numpy()),
            answer=result.text,
            image_size=batch["original_size"][sample],
            pred_scores=result.scores,
        )


@torch.no_grad()
def evaluate(
    model,
    raw_dataset: Dataset,
    protocol: str = TEACHER_FORCED,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    workers: int = 0,
    precision: str = "fp32",
    description: str = "validate",
    show_progress: bool = True,
    groups: Iterable[str] = (),
    group_of: GroupOf | None = None,
    on_prediction: PredictionSink | None = None,
    max_new_tokens: int = 64,
    generate_kwargs: dict | None = None,
    on_detections: DetectionSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_unreadable: UnreadableSink | None = None,
) -> dict:
    """Score a whole split under ``protocol`` (this rank's shard, reduced over all ranks).

    Args:
        model: a ``ReasonSegmenter`` (not wrapped in DDP). Its training mode is restored after.
        groups, group_of: extra score columns (e.g. ReasonSeg's short/long queries).
        on_prediction: receives one record per question of this rank's shard (see
            :meth:`SplitScorer._record`: RLE masks, boxes, answer, per-target counts).
        max_new_tokens, generate_kwargs: ``generate`` only (e.g. a logits processor).
        on_detections: ``generate`` on a COCO-format split: receives this rank's COCO results
            records, one call per answer (see :class:`SplitScorer`).
        on_unreadable: receives the indices (in ``raw_dataset``) of this rank's unreadable
            items, one call per batch that has some: their questions have no answer and no
            detection, which COCO AP must not count as the model's (see ``utils.eval_cli``).
        should_stop: checked before each batch; true stops this rank's evaluation there (a
            training run's SIGTERM: torchrun kills its workers 30 s after forwarding it), and the
            result is ``{"interrupted": True, ...}`` on every rank.
    Returns:
        see :meth:`SplitScorer.result`.
    Raises:
        ValueError: an empty split; :class:`NothingScoredError` (a ValueError): no mask scored
            (every sample unreadable, or under teacher forcing every question a no-target one).
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
    if len(raw_dataset) == 0:
        raise ValueError(f"the evaluation split {description!r} is empty")
    device = model.device
    generate = protocol == GENERATE
    # Every question is asked as its own conversation (validation items have one question each).
    encoder = SampleEncoder(model.processor, model.sam_transform, conversation_mode=SINGLE_TURN)
    dataset = EncodedDataset(raw_dataset, encoder, open_prompts=generate)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedEvalSampler(len(dataset), rank, world_size),
        collate_fn=partial(_collate_present, model, padding_side="left" if generate else "right", merge_images=generate),
        num_workers=workers,
        worker_init_fn=ignore_stop_signals,
    )
    step = partial(_score_generated, max_new_tokens=max_new_tokens, generate_kwargs=generate_kwargs) if generate else _score_teacher_forced
    scorer = SplitScorer(
        protocol, groups=groups, group_of=group_of, on_prediction=on_prediction, on_detections=on_detections
    )
    was_training = model.training
    image_tokens: list[int] = []
    model.eval()
    try:
        for item in tqdm(loader, desc=description, disable=not show_progress, leave=False):
            if should_stop is not None and should_stop():
                scorer.counters["interrupted"] = 1
                break
            scorer.counters["unreadable"] += len(item["unreadable"])
            if item["unreadable"] and on_unreadable is not None:
                on_unreadable(item["unreadable"])
            scorer.counters["items"] += item["items"]
            for sample in item["without_forward"]:  # no given [SEG]: no mask predicted, none to score
                _add_teacher_forced_sample(scorer, sample["extra"], [], [], sample["original_size"])
            if item["batch"] is None:
                continue
            image_tokens += model.image_token_counts(item["batch"])
            batch = to_device(item["batch"], device)
            with autocast_context(device, precision):
                step(model, batch, scorer)
    finally:
        model.train(was_training)
    if image_tokens:
        logger.info(
            "%s: image tokens per image %.0f on average, %d at most (%d images on this process)",
            description, sum(image_tokens) / len(image_tokens), max(image_tokens), len(image_tokens),
        )
    return scorer.result(device, description)


def evaluate_teacher_forced(model, raw_dataset: Dataset, **kwargs: Any) -> dict:
    """:func:`evaluate` under teacher forcing (keywords as there): the protocol of training
    validation (``utils.trainer``) and of LISA's published numbers."""
    return evaluate(model, raw_dataset, TEACHER_FORCED, **kwargs)
