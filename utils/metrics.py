"""Segmentation metrics, exactly as LISA defines them, plus box and no-target metrics.

This is the only implementation of metrics in the project: training validation,
test.py and the evaluation of every benchmark call it.

Inputs
------
* **prediction** ``[H, W]`` (numpy or torch): boolean (``True`` = foreground),
  floating point = **logits**, thresholded at ``> 0`` (do *not* pass
  probabilities: ``sigmoid(x) > 0`` is always true), or integer = non-zero is
  foreground.
* **ground truth** ``[H, W]``: integer label map with ``1`` = target, ``0`` =
  background, ``255`` = ignore (any other value raises ``ValueError``), or a
  boolean mask (no ignore pixels). Floating ground truths holding exactly
  0/1/255 are accepted too.

Per mask (LISA)
---------------
Pixels whose ground truth is 255 are removed from both prediction and target.
Then ``I = |pred & gt|``, ``U = |pred | gt|`` and
``IoU = I / (U + 1e-5)``, except ``IoU = 1.0`` when ``U == 0`` (empty target and
empty prediction).

Over a split
------------
* ``giou`` = mean per-mask IoU; ``ciou`` = ``sum(I) / (sum(U) + 1e-10)`` (so 0.0
  if every mask is empty/empty, as in LISA).
* ``precision@t`` = share of masks whose IoU >= t, for t in 0.5 .. 0.9. The
  comparison uses the exact ratio ``I / U`` (1.0 when ``U == 0``) in integer
  arithmetic, so an IoU of exactly 0.5 passes @0.5 (LISA's ``+1e-5`` would put
  it a hair below).
* ``box_iou`` = mean IoU of the tight box of the prediction vs the tight box of
  the target (both after removing ignore pixels; both empty = 1.0, one empty =
  0.0); ``box_acc@0.5`` = share of masks with box IoU >= 0.5 (exact ratio again).
  Boxes are ``(x0, y0, x1, y1)`` with exclusive ``x1``/``y1`` (see ``utils.masks``).
* ``n_acc`` (gRefCOCO / GRES "N-acc") = among masks whose target is empty, the
  share whose prediction is empty, i.e. no-target samples correctly predicted
  as no-target; ``None`` if the split has no empty target. ``t_acc`` likewise =
  among masks with a non-empty target, the share with a non-empty prediction.
  "Empty" is judged after removing ignore pixels. (The evaluation feeds no-target
  expressions to the meter only under free generation: teacher forcing gives
  their answer without ``[SEG]`` and cannot score them, see ``utils.evaluation``.)

Boxes as detections (per answer, all its boxes)
----------------------------------------------
* :func:`match_boxes` matches an answer's predicted boxes (one per ``[SEG]`` with a
  non-empty mask) to its target boxes one to one, maximising the summed box IoU (Hungarian,
  ``scipy.optimize.linear_sum_assignment``); assigned pairs without overlap are not matches.
* :class:`DetectionMeter` sums over a split and :func:`detection_scores_from_state` gives
  ``precision@0.5``, ``recall@0.5``, ``f1@0.5`` (micro-averaged: true positives = matched
  pairs with box IoU >= 0.5), ``matched_iou`` (mean IoU of the matched pairs) and
  ``exact@0.5`` (share of answers with F1 = 1: GREC's Pr@(F1=1, IoU>=0.5)).
* :func:`coco_average_precision`: COCO box / mask AP, AP50, AP75 with pycocotools'
  ``COCOeval`` itself, from a COCO results file.

All scores are fractions in [0, 1] (multiply by 100 for papers).

Exact distributed accumulation
------------------------------
:class:`SegmentationMeter` keeps only Python-int sums (per-mask IoUs are
accumulated in fixed point, ``round(iou * 2**40)``), so summing states is exact
and order-independent: one meter over all masks and the states of several meters
summed key by key (all-reduced across ranks with :func:`reduce_state_across_ranks`)
give identical scores. The fixed point costs < 1e-12 per mask; int64 sums hold ~8 million
masks per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from utils.masks import (
    IGNORE_LABEL,
    Box,
    box_intersection_union,
    box_iou,
    mask_to_box,
    to_numpy,
)

__all__ = [
    "IOU_EPS",
    "CIOU_EPS",
    "IOU_FIXED_POINT_SCALE",
    "DEFAULT_PRECISION_THRESHOLDS",
    "DEFAULT_BOX_THRESHOLDS",
    "MaskCounts",
    "prepare_masks",
    "compute_counts",
    "SegmentationMeter",
    "scores_from_state",
    "reduce_state_across_ranks",
    "DETECTION_IOU_THRESHOLD",
    "BoxMatch",
    "match_boxes",
    "DetectionMeter",
    "detection_scores_from_state",
    "coco_average_precision",
]

#: LISA's per-mask epsilon: IoU = I / (U + IOU_EPS).
IOU_EPS = 1e-5
#: LISA's cumulative epsilon: cIoU = sum(I) / (sum(U) + CIOU_EPS).
CIOU_EPS = 1e-10
#: Per-mask IoUs are summed as ``round(iou * IOU_FIXED_POINT_SCALE)`` (exact integer sums).
IOU_FIXED_POINT_SCALE = 2**40
DEFAULT_PRECISION_THRESHOLDS: Tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_BOX_THRESHOLDS: Tuple[float, ...] = (0.5,)

_INT64_MAX = 2**63 - 1
GroupArg = Union[None, str, Iterable[str]]


# --------------------------------------------------------------------------- per mask


@dataclass(frozen=True)
class MaskCounts:
    """Everything the metrics need from one (prediction, target) pair.

    ``pred_box``/``gt_box`` are tight boxes after removing ignore pixels
    (``None`` = empty). Build it with :func:`compute_counts`, or directly when
    the counts were computed elsewhere (e.g. on GPU).
    """

    intersection: int
    union: int
    pred_box: Optional[Box]
    gt_box: Optional[Box]

    def __post_init__(self) -> None:
        if not 0 <= self.intersection <= self.union:
            raise ValueError(
                f"need 0 <= intersection <= union, got I={self.intersection}, U={self.union}"
            )

    @property
    def iou(self) -> float:
        """LISA per-mask IoU: ``I / (U + 1e-5)``, 1.0 when ``U == 0``."""
        if self.union == 0:
            return 1.0
        return self.intersection / (self.union + IOU_EPS)

    @property
    def box_iou(self) -> float:
        """IoU of the two tight boxes (both empty = 1.0, one empty = 0.0)."""
        return box_iou(self.pred_box, self.gt_box)


def _as_prediction(pred: Any) -> np.ndarray:
    arr = to_numpy(pred)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr > 0
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise TypeError(f"prediction has unsupported dtype {arr.dtype}")


def _as_target(gt: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(foreground, ignore or None)`` of a ground truth."""
    arr = to_numpy(gt)
    if arr.dtype == np.bool_:
        return arr, None
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"ground truth has unsupported dtype {arr.dtype}")
    fg = arr == 1
    ignore = arr == IGNORE_LABEL
    n_fg, n_ignore = np.count_nonzero(fg), np.count_nonzero(ignore)
    if n_fg + n_ignore + np.count_nonzero(arr == 0) != arr.size:
        bad = np.unique(arr[(arr != 0) & ~fg & ~ignore])[:5]
        raise ValueError(
            "ground truth must contain only 0 (background), 1 (target) and "
            f"{IGNORE_LABEL} (ignore); found other values such as {bad.tolist()}"
        )
    return fg, (ignore if n_ignore else None)


def prepare_masks(pred: Any, gt: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Boolean ``(pred, target)`` with ignore pixels removed from both (see module docstring).

    Raises ``ValueError`` if the shapes differ or are not 2-D.
    """
    p = _as_prediction(pred)
    g, ignore = _as_target(gt)
    if p.ndim != 2 or p.shape != g.shape:
        raise ValueError(
            f"prediction and ground truth must be 2-D masks of the same shape, got "
            f"pred {tuple(p.shape)} and gt {tuple(g.shape)}"
        )
    if ignore is not None:
        p = p & ~ignore
    return p, g


def compute_counts(pred: Any, gt: Any) -> MaskCounts:
    """I, U and tight boxes of one (prediction, ground truth) pair."""
    p, g = prepare_masks(pred, gt)
    n_pred, n_gt = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    inter = int(np.count_nonzero(p & g)) if n_pred and n_gt else 0
    union = n_pred + n_gt - inter
    pred_box = mask_to_box(p) if n_pred else None
    gt_box = mask_to_box(g) if n_gt else None
    return MaskCounts(intersection=inter, union=union, pred_box=pred_box, gt_box=gt_box)


# --------------------------------------------------------------------------- thresholds


def _threshold_fraction(t: float) -> Fraction:
    frac = Fraction(str(t))  # 0.7 -> 7/10 exactly
    if not 0 < frac <= 1:
        raise ValueError(f"thresholds must be in (0, 1], got {t}")
    return frac


def _threshold_tag(t: float) -> str:
    return f"{float(t):g}"


def _ratio_at_least(inter: int, union: int, frac: Fraction) -> bool:
    """``inter / union >= frac`` for ``union > 0``, in integers: an IoU of exactly t passes."""
    return inter * frac.denominator >= frac.numerator * union


def _passes(inter: int, union: int, frac: Fraction) -> bool:
    """Exact ``I / U >= t`` (``U == 0`` counts as ratio 1)."""
    return union == 0 or _ratio_at_least(inter, union, frac)


def _box_passes(pred_box: Optional[Box], gt_box: Optional[Box], frac: Fraction) -> bool:
    """Exact ``box_iou >= t`` with :func:`utils.masks.box_iou`'s ``None`` rules."""
    if pred_box is None and gt_box is None:
        return True
    inter, union = box_intersection_union(pred_box, gt_box)
    return union > 0 and _ratio_at_least(inter, union, frac)


def _fixed_point(iou: float) -> int:
    """An IoU as the integer that the meters sum (see "Exact distributed accumulation")."""
    return int(round(iou * IOU_FIXED_POINT_SCALE))


def _threshold_tags(state: Mapping[str, int], prefix: str) -> List[str]:
    """The threshold tags of a state's ``<prefix><tag>`` fields, in increasing order."""
    return sorted((k[len(prefix):] for k in state if k.startswith(prefix)), key=float)


# --------------------------------------------------------------------------- state


_PRECISION_PREFIX = "precision_hits@"
_BOX_PREFIX = "box_hits@"
_BASE_FIELDS = (
    "count",
    "sum_intersection",
    "sum_union",
    "sum_iou_fixed",
    "sum_box_iou_fixed",
    "no_target_count",
    "no_target_correct",
    "target_count",
    "target_correct",
)


def _field_names(precision_tags: Sequence[str], box_tags: Sequence[str]) -> List[str]:
    return (
        list(_BASE_FIELDS)
        + [_PRECISION_PREFIX + t for t in precision_tags]
        + [_BOX_PREFIX + t for t in box_tags]
    )


def _split_key(key: str) -> Tuple[Optional[str], str]:
    if "/" in key:
        group, field = key.split("/", 1)
        return group, field
    return None, key


def _check_group_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"group names must be non-empty strings without '/', got {name!r}")
    return name


def _groups_of(group: GroupArg) -> List[str]:
    if group is None:
        return []
    if isinstance(group, str):
        return [_check_group_name(group)]
    return [_check_group_name(g) for g in group]


def scores_from_state(state: Mapping[str, Any], group: Optional[str] = None) -> Dict[str, Any]:
    """Scores from a meter state (e.g. after :func:`reduce_state_across_ranks`).

    Returns ``count``, ``giou``, ``ciou``, ``precision@t`` per threshold,
    ``box_iou``, ``box_acc@t`` per box threshold, ``n_acc`` (``None`` when there
    is no empty target), ``no_target_count``, ``t_acc`` (``None`` when there is
    no non-empty target), ``target_count``, and the raw ``sum_intersection`` and
    ``sum_union``. ``group=None`` gives the overall scores.

    Raises ``ValueError`` if the group has no masks (an empty split is an
    error, not a score) and ``KeyError`` for an unknown group.
    """
    prefix = "" if group is None else _check_group_name(group) + "/"
    if prefix + "count" not in state:
        known = sorted({g for g, _ in map(_split_key, state) if g is not None})
        raise KeyError(f"no group {group!r} in state (known groups: {known})")
    s = {k[len(prefix):]: int(v) for k, v in state.items() if k.startswith(prefix)
         and "/" not in k[len(prefix):]}
    count = s["count"]
    if count <= 0:
        where = "overall" if group is None else f"group {group!r}"
        raise ValueError(f"no masks were accumulated ({where}); an empty split has no score")
    scale = float(IOU_FIXED_POINT_SCALE) * count
    out: Dict[str, Any] = {
        "count": count,
        "giou": s["sum_iou_fixed"] / scale,
        "ciou": s["sum_intersection"] / (s["sum_union"] + CIOU_EPS),
    }
    for tag in _threshold_tags(s, _PRECISION_PREFIX):
        out[f"precision@{tag}"] = s[_PRECISION_PREFIX + tag] / count
    out["box_iou"] = s["sum_box_iou_fixed"] / scale
    for tag in _threshold_tags(s, _BOX_PREFIX):
        out[f"box_acc@{tag}"] = s[_BOX_PREFIX + tag] / count
    n_nt, n_t = s["no_target_count"], s["target_count"]
    out["n_acc"] = s["no_target_correct"] / n_nt if n_nt else None
    out["no_target_count"] = n_nt
    out["t_acc"] = s["target_correct"] / n_t if n_t else None
    out["target_count"] = n_t
    out["sum_intersection"] = s["sum_intersection"]
    out["sum_union"] = s["sum_union"]
    return out


# --------------------------------------------------------------------------- meter


class SegmentationMeter:
    """Accumulates per-mask counts for a split, overall and per named group.

    Example::

        meter = SegmentationMeter(groups=("short", "long"))
        for pred_logits, gt, is_sentence in samples:
            meter.update(pred_logits, gt, group="long" if is_sentence else "short")
        state = reduce_state_across_ranks(meter.state())   # exact; no-op without DDP
        overall = scores_from_state(state)
        long_only = scores_from_state(state, group="long")

    Every update counts towards the overall scores and towards each group it names.
    Declare groups in the constructor when running distributed so that every rank
    has the same keys (:func:`reduce_state_across_ranks` also copes when they do not).
    """

    def __init__(
        self,
        groups: Iterable[str] = (),
        precision_thresholds: Sequence[float] = DEFAULT_PRECISION_THRESHOLDS,
        box_thresholds: Sequence[float] = DEFAULT_BOX_THRESHOLDS,
    ) -> None:
        self._precision = [(_threshold_tag(t), _threshold_fraction(t)) for t in precision_thresholds]
        self._box = [(_threshold_tag(t), _threshold_fraction(t)) for t in box_thresholds]
        self._fields = _field_names([t for t, _ in self._precision], [t for t, _ in self._box])
        self._declared = _groups_of(list(groups))
        self._state: Dict[str, int] = {}
        self.reset()

    # -- bookkeeping
    def reset(self) -> None:
        """Zero all sums; keep only the groups declared in the constructor."""
        self._state = {f: 0 for f in self._fields}
        for g in self._declared:
            self._ensure_group(g)

    def _ensure_group(self, group: str) -> None:
        if group + "/count" not in self._state:
            for f in self._fields:
                self._state[f"{group}/{f}"] = 0

    @property
    def groups(self) -> List[str]:
        """Names of the groups seen or declared, sorted."""
        return sorted({g for g, _ in map(_split_key, self._state) if g is not None})

    def __len__(self) -> int:
        return self._state["count"]

    # -- accumulation
    def update(self, pred: Any, gt: Any, group: GroupArg = None) -> MaskCounts:
        """Add one (prediction, ground truth) pair; returns its :class:`MaskCounts`.

        ``group`` is ``None``, a group name, or several names.
        """
        counts = compute_counts(pred, gt)
        self.update_counts(counts, group=group)
        return counts

    def update_counts(self, counts: MaskCounts, group: GroupArg = None) -> None:
        """Add one mask's precomputed counts (e.g. computed on GPU)."""
        inter, union = int(counts.intersection), int(counts.union)
        delta = {
            "count": 1,
            "sum_intersection": inter,
            "sum_union": union,
            "sum_iou_fixed": _fixed_point(counts.iou),
            "sum_box_iou_fixed": _fixed_point(counts.box_iou),
        }
        if counts.gt_box is None:
            delta["no_target_count"] = 1
            delta["no_target_correct"] = int(counts.pred_box is None)
        else:
            delta["target_count"] = 1
            delta["target_correct"] = int(counts.pred_box is not None)
        for tag, frac in self._precision:
            delta[_PRECISION_PREFIX + tag] = int(_passes(inter, union, frac))
        for tag, frac in self._box:
            delta[_BOX_PREFIX + tag] = int(_box_passes(counts.pred_box, counts.gt_box, frac))

        prefixes = [""] + [g + "/" for g in _groups_of(group)]
        for prefix in prefixes:
            if prefix:
                self._ensure_group(prefix[:-1])
            for k, v in delta.items():
                self._state[prefix + k] += v

    # -- state
    def state(self) -> Dict[str, int]:
        """A copy of the plain integer sums (flat; group fields are ``"<group>/<field>"``)."""
        return dict(self._state)

    def scores(self, group: Optional[str] = None) -> Dict[str, Any]:
        """Scores overall (``group=None``) or for one group; see :func:`scores_from_state`."""
        return scores_from_state(self._state, group=group)


# --------------------------------------------------------------------------- distributed


def reduce_state_across_ranks(
    state: Mapping[str, Any], process_group: Any = None, device: Any = None
) -> Dict[str, int]:
    """Sum a meter state over all ranks (exact: int64 ``all_reduce``).

    A no-op copy when ``torch.distributed`` is unavailable or not initialised.
    Keys missing on some ranks (groups seen on only some ranks) are filled with 0
    after an ``all_gather_object`` of the key sets. Every rank must call it.
    ``device`` defaults to the current CUDA device for the NCCL backend, else CPU.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a project dependency
        return {k: int(v) for k, v in state.items()}
    if not (dist.is_available() and dist.is_initialized()):
        return {k: int(v) for k, v in state.items()}

    world = dist.get_world_size(group=process_group)
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, sorted(state), group=process_group)
    keys = sorted(set().union(*map(set, gathered)))
    values = [int(state.get(k, 0)) for k in keys]
    if any(abs(v) > _INT64_MAX // max(world, 1) for v in values):
        raise OverflowError("meter state too large for an exact int64 all_reduce")
    if device is None:
        backend = dist.get_backend(process_group)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if str(backend) == "nccl"
            else torch.device("cpu")
        )
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return dict(zip(keys, (int(v) for v in tensor.tolist())))


# --------------------------------------------------------------------------- detection (boxes)

#: The IoU at which a matched (prediction, target) box pair is a true positive.
DETECTION_IOU_THRESHOLD = 0.5

_DETECTION_FIELDS = (
    "answers", "predictions", "targets", "matched", "sum_matched_iou_fixed",
)
_TP_PREFIX = "true_positives@"
_EXACT_PREFIX = "exact_answers@"


@dataclass(frozen=True)
class BoxMatch:
    """The one-to-one matching of one answer's predicted boxes to its target boxes.

    ``pairs`` are ``(prediction index, target index, box IoU)`` of the matched pairs, indices
    into the boxes given to :func:`match_boxes` (``None`` boxes included in the numbering);
    ``intersections_unions`` holds each pair's box intersection and union in pixels, so that
    thresholds are compared exactly. ``num_predictions`` / ``num_targets`` count the non-``None``
    boxes.
    """

    pairs: Tuple[Tuple[int, int, float], ...]
    num_predictions: int
    num_targets: int
    intersections_unions: Tuple[Tuple[int, int], ...]

    def true_positives(self, threshold: float = DETECTION_IOU_THRESHOLD) -> int:
        """Matched pairs whose box IoU >= ``threshold`` (exact integer comparison)."""
        frac = _threshold_fraction(threshold)
        return sum(_ratio_at_least(inter, union, frac) for inter, union in self.intersections_unions)

    def exact(self, threshold: float = DETECTION_IOU_THRESHOLD) -> bool:
        """F1 = 1 at ``threshold``: every target matched at IoU >= threshold and no other
        prediction (an answer with no target and no prediction is exact)."""
        tp = self.true_positives(threshold)
        return tp == self.num_targets == self.num_predictions


def match_boxes(pred_boxes: Sequence[Optional[Box]], gt_boxes: Sequence[Optional[Box]]) -> BoxMatch:
    """Match one answer's predicted boxes to its target boxes, one to one.

    The assignment maximises the sum of box IoU (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``); assigned pairs that do not overlap at all
    (IoU 0) are not matches. ``None`` boxes (empty masks) are neither predictions nor targets.
    Boxes are ``(x0, y0, x1, y1)`` with exclusive ``x1``/``y1`` (see ``utils.masks``).
    """
    preds = [(i, tuple(b)) for i, b in enumerate(pred_boxes) if b is not None]
    gts = [(j, tuple(b)) for j, b in enumerate(gt_boxes) if b is not None]
    pairs: List[Tuple[int, int, float]] = []
    counts: List[Tuple[int, int]] = []
    if preds and gts:
        from scipy.optimize import linear_sum_assignment

        iu = [[box_intersection_union(p, g) for _, g in gts] for _, p in preds]
        iou = np.array([[i / u if u > 0 else 0.0 for i, u in row] for row in iu], dtype=np.float64)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            inter, union = iu[r][c]
            if inter > 0:
                pairs.append((preds[r][0], gts[c][0], float(iou[r, c])))
                counts.append((inter, union))
    return BoxMatch(tuple(pairs), len(preds), len(gts), tuple(counts))


class DetectionMeter:
    """Box detection counts over a split: one :meth:`update` per answer.

    Per answer, the boxes are matched by :func:`match_boxes`; the meter sums the predictions,
    targets, true positives at each threshold (matched pairs with IoU >= t), matched pairs,
    matched IoU (fixed point, exact integer sums as :class:`SegmentationMeter`) and exact
    answers (F1 = 1). :func:`detection_scores_from_state` turns the sums into scores; the
    state reduces across ranks with :func:`reduce_state_across_ranks`.
    """

    def __init__(self, thresholds: Sequence[float] = (DETECTION_IOU_THRESHOLD,)) -> None:
        self._thresholds = [(_threshold_tag(t), float(t)) for t in thresholds]
        for _, t in self._thresholds:
            _threshold_fraction(t)
        self._state: Dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self._state = {f: 0 for f in _DETECTION_FIELDS}
        for tag, _ in self._thresholds:
            self._state[_TP_PREFIX + tag] = 0
            self._state[_EXACT_PREFIX + tag] = 0

    def update(self, pred_boxes: Sequence[Optional[Box]], gt_boxes: Sequence[Optional[Box]]) -> BoxMatch:
        """Add one answer's predicted boxes and its target boxes; returns the matching."""
        match = match_boxes(pred_boxes, gt_boxes)
        s = self._state
        s["answers"] += 1
        s["predictions"] += match.num_predictions
        s["targets"] += match.num_targets
        s["matched"] += len(match.pairs)
        s["sum_matched_iou_fixed"] += sum(_fixed_point(iou) for _, _, iou in match.pairs)
        for tag, t in self._thresholds:
            s[_TP_PREFIX + tag] += match.true_positives(t)
            s[_EXACT_PREFIX + tag] += int(match.exact(t))
        return match

    def state(self) -> Dict[str, int]:
        return dict(self._state)

    def scores(self) -> Dict[str, Any]:
        return detection_scores_from_state(self._state)


def detection_scores_from_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Detection scores from a :class:`DetectionMeter` state (micro-averaged over the split).

    With P predictions, T targets and TP true positives at threshold t (all summed over the
    answers): ``precision@t = TP / P`` (None when P = 0), ``recall@t = TP / T`` (None when
    T = 0), ``f1@t = 2 TP / (P + T)`` (their harmonic mean; 0 when exactly one of P, T is 0;
    None when both are), ``matched_iou`` = mean box IoU of the matched pairs (None when there
    is none), ``exact@t`` = share of answers with F1 = 1 (gRefCOCO's GREC
    "Pr@(F1=1, IoU>=0.5)"); plus the counts ``answers``, ``predictions``, ``targets``,
    ``matched`` and ``true_positives@t``.
    """
    s = {k: int(v) for k, v in state.items()}
    answers, p, t = s["answers"], s["predictions"], s["targets"]
    out: Dict[str, Any] = {"answers": answers, "predictions": p, "targets": t, "matched": s["matched"]}
    for tag in _threshold_tags(s, _TP_PREFIX):
        tp = s[_TP_PREFIX + tag]
        out[f"precision@{tag}"] = tp / p if p else None
        out[f"recall@{tag}"] = tp / t if t else None
        out[f"f1@{tag}"] = 2 * tp / (p + t) if p + t else None
        out[f"exact@{tag}"] = s[_EXACT_PREFIX + tag] / answers if answers else None
        out[f"true_positives@{tag}"] = tp
    out["matched_iou"] = (
        s["sum_matched_iou_fixed"] / (float(IOU_FIXED_POINT_SCALE) * s["matched"]) if s["matched"] else None
    )
    return out


# --------------------------------------------------------------------------- COCO AP

_COCO_STATS = (("AP", 0), ("AP50", 1), ("AP75", 2))


def _quiet_coco(call, *args):
    """Run a pycocotools call, its prints going to the debug log instead of stdout."""
    import contextlib
    import io
    import logging

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = call(*args)
    if buffer.getvalue().strip():
        logging.getLogger(__name__).debug("pycocotools: %s", buffer.getvalue().strip())
    return result


def _complete_ground_truth(content: Dict[str, Any]) -> Dict[str, Any]:
    """A COCO dict with the fields COCOeval reads filled in where a file leaves them out
    (``iscrowd`` 0, ``area`` and ``bbox`` from the segmentation)."""
    from pycocotools import mask as mask_util

    images = {img["id"]: img for img in content.get("images", [])}
    annotations = []
    for ann in content.get("annotations", []):
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann or "bbox" not in ann:
            img = images[ann["image_id"]]
            h, w = int(img["height"]), int(img["width"])
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if seg else None
            elif isinstance(seg.get("counts"), list):
                rle = mask_util.frPyObjects(seg, h, w)
            else:
                rle = seg
            if rle is None:
                ann.setdefault("area", 0.0)
                ann.setdefault("bbox", [0.0, 0.0, 0.0, 0.0])
            else:
                ann.setdefault("area", float(mask_util.area(rle)))
                ann.setdefault("bbox", [float(v) for v in mask_util.toBbox(rle)])
        annotations.append(ann)
    return {**content, "annotations": annotations}


def coco_average_precision(
    ground_truth: Union[str, Mapping[str, Any]],
    detections: Union[str, Sequence[Mapping[str, Any]]],
    iou_type: str = "bbox",
    image_ids: Optional[Iterable[int]] = None,
) -> Dict[str, Optional[float]]:
    """COCO AP, AP50 and AP75 of ``detections`` with pycocotools' ``COCOeval`` (nothing re-implemented).

    Args:
        ground_truth: a COCO instances file (path) or its parsed dict. Annotations without
            ``iscrowd``/``area``/``bbox`` get them (0 / from the segmentation) before scoring.
        detections: a COCO results file (path) or list: ``image_id``, ``category_id``,
            ``score``, and ``bbox`` ``[x, y, w, h]`` (``iou_type="bbox"``) or ``segmentation``
            (COCO RLE, ``iou_type="segm"``; a ``bbox`` is then dropped, as detectron2 does, so
            that the area of a mask detection is the mask's).
        image_ids: the images scored (COCOeval's ``params.imgIds``); default every image of
            ``ground_truth``. Give the images the run answered every request about.
    Returns:
        ``{"AP", "AP50", "AP75"}``: COCOeval's ``stats[0:3]`` (IoU 0.50:0.95, 0.50, 0.75; all
        areas; up to 100 detections per image). ``None`` where COCOeval has nothing to score
        (no ground truth in the scored images). With no detection at all (which ``loadRes``
        cannot take) AP is 0.0 when there is ground truth, else ``None``.
    """
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if isinstance(ground_truth, (str, bytes)) or hasattr(ground_truth, "__fspath__"):
        with open(ground_truth, encoding="utf-8") as handle:
            ground_truth = json.load(handle)
    if isinstance(detections, (str, bytes)) or hasattr(detections, "__fspath__"):
        with open(detections, encoding="utf-8") as handle:
            detections = json.load(handle)
    gt = COCO()
    gt.dataset = _complete_ground_truth(dict(ground_truth))
    _quiet_coco(gt.createIndex)
    img_ids = sorted(gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    if not img_ids:
        return {name: None for name, _ in _COCO_STATS}
    scored = set(img_ids)
    dets = []
    for det in detections:
        det = dict(det)
        if iou_type == "segm":
            det.pop("bbox", None)
            if "segmentation" not in det:
                raise ValueError("segm AP needs a 'segmentation' (COCO RLE) in every detection")
        else:
            if "bbox" not in det:
                raise ValueError("bbox AP needs a 'bbox' [x, y, w, h] in every detection")
        if int(det["image_id"]) in scored:
            dets.append(det)
    has_gt = bool(gt.getAnnIds(imgIds=img_ids, iscrowd=False))
    if not dets:
        value = 0.0 if has_gt else None
        return {name: value for name, _ in _COCO_STATS}
    dt = _quiet_coco(gt.loadRes, dets)
    evaluator = COCOeval(gt, dt, iou_type)
    evaluator.params.imgIds = img_ids
    _quiet_coco(evaluator.evaluate)
    _quiet_coco(evaluator.accumulate)
    _quiet_coco(evaluator.summarize)
    return {name: (float(evaluator.stats[i]) if evaluator.stats[i] >= 0 else None) for name, i in _COCO_STATS}
