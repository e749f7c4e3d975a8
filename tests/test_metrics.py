"""Tests for utils/metrics.py against hand-computed LISA values."""

import numpy as np
import pytest

from utils.metrics import (
    IOU_EPS,
    MaskCounts,
    SegmentationMeter,
    compute_counts,
    reduce_state_across_ranks,
    scores_from_state,
)

TOL = 1e-12  # fixed-point accumulation of per-mask IoUs is exact to < 1e-12


def segmentation_scores(preds, gts, **thresholds):
    """The scores of a split: a meter fed with the pairs in order, as evaluation feeds it."""
    meter = SegmentationMeter(**thresholds)
    for pred, gt in zip(preds, gts, strict=True):
        meter.update(pred, gt)
    return meter.scores()


def mask_iou(pred, gt):
    return segmentation_scores([pred], [gt])["giou"]


def intersection_union(pred, gt):
    counts = compute_counts(pred, gt)
    return counts.intersection, counts.union


# 4x4 example with ignore pixels.
#   gt                     pred
#   0   0   0   0          0 0 0 0
#   0   1   1   0          0 1 1 1
#   0   1   1   255        0 1 0 1   <- pred at (2,3) lies on ignore: removed
#   255 0   0   255        1 0 0 0   <- pred at (3,0) lies on ignore: removed
# After removing ignore pixels: pred = {(1,1),(1,2),(1,3),(2,1)} (4 px),
# gt = {(1,1),(1,2),(2,1),(2,2)} (4 px); I = {(1,1),(1,2),(2,1)} = 3; U = 4 + 4 - 3 = 5.
# (Had ignore pixels counted as background, U would be 7.)
# IoU = 3 / (5 + 1e-5). Boxes: pred (1,1,4,3) area 6, gt (1,1,3,3) area 4 -> box IoU 4/6.
GT_4x4 = np.array(
    [[0, 0, 0, 0],
     [0, 1, 1, 0],
     [0, 1, 1, 255],
     [255, 0, 0, 255]], dtype=np.uint8)
PRED_4x4 = np.array(
    [[0, 0, 0, 0],
     [0, 1, 1, 1],
     [0, 1, 0, 1],
     [1, 0, 0, 0]], dtype=bool)


def test_4x4_hand_example_with_ignore():
    c = compute_counts(PRED_4x4, GT_4x4)
    assert (c.intersection, c.union) == (3, 5)
    assert c.iou == 3 / (5 + IOU_EPS)
    assert mask_iou(PRED_4x4, GT_4x4) == pytest.approx(3 / (5 + IOU_EPS), abs=TOL)
    assert intersection_union(PRED_4x4, GT_4x4) == (3, 5)
    assert c.pred_box == (1, 1, 4, 3)  # ignore pixels removed from the prediction too
    assert c.gt_box == (1, 1, 3, 3)
    assert c.box_iou == pytest.approx(4 / 6)


def test_logits_and_torch_inputs():
    logits = np.where(PRED_4x4, 2.5, -1.0).astype(np.float32)
    logits[0, 0] = 0.0  # exactly 0 is background (> 0 is foreground)
    assert intersection_union(logits, GT_4x4) == (3, 5)
    torch = pytest.importorskip("torch")
    assert intersection_union(torch.from_numpy(logits), torch.from_numpy(GT_4x4)) == (3, 5)
    assert intersection_union(torch.from_numpy(PRED_4x4), torch.from_numpy(GT_4x4).float()) == (3, 5)
    # bool ground truth: no ignore pixels
    assert intersection_union(PRED_4x4, GT_4x4 == 1) == (3, 7)


def test_empty_cases():
    empty = np.zeros((3, 5), dtype=np.uint8)
    some = empty.copy()
    some[1, 2] = 1
    assert mask_iou(empty.astype(bool), empty) == 1.0  # empty target, empty prediction
    assert mask_iou(some.astype(bool), empty) == 0.0  # empty target, non-empty prediction
    assert mask_iou(empty.astype(bool), some) == 0.0  # empty prediction, non-empty target
    # a prediction only on ignore pixels is an empty prediction
    ign = empty.copy()
    ign[0, 0] = 255
    pred = np.zeros((3, 5), bool)
    pred[0, 0] = True
    c = compute_counts(pred, ign)
    assert (c.intersection, c.union, c.pred_box, c.gt_box) == (0, 0, None, None)
    assert c.iou == 1.0


def _several():
    """Four masks: A (the 4x4 example), B, C (empty/empty), D (disjoint)."""
    # B: gt 10x10 block in 20x20 (100 px), pred its left half (50 px): I=50, U=100
    gt_b = np.zeros((20, 20), np.uint8)
    gt_b[0:10, 0:10] = 1
    pred_b = np.zeros((20, 20), bool)
    pred_b[0:10, 0:5] = True
    # C: 3x5 empty target, empty prediction: I=0, U=0 (IoU 1)
    gt_c = np.zeros((3, 5), np.uint8)
    pred_c = np.zeros((3, 5), bool)
    # D: gt 2x2 (4 px), pred 1 px elsewhere: I=0, U=5
    gt_d = np.zeros((4, 4), np.uint8)
    gt_d[0:2, 0:2] = 1
    pred_d = np.zeros((4, 4), bool)
    pred_d[3, 3] = True
    return [PRED_4x4, pred_b, pred_c, pred_d], [GT_4x4, gt_b, gt_c, gt_d]


def test_several_masks_giou_ciou_precision_boxes():
    preds, gts = _several()
    s = segmentation_scores(preds, gts)
    giou = (3 / (5 + 1e-5) + 50 / (100 + 1e-5) + 1.0 + 0.0) / 4  # ~0.525
    ciou = (3 + 50 + 0 + 0) / (5 + 100 + 0 + 5 + 1e-10)  # 53/110 ~ 0.4818
    assert s["count"] == 4
    assert s["giou"] == pytest.approx(giou, abs=TOL)
    assert s["ciou"] == ciou
    assert abs(s["giou"] - s["ciou"]) > 0.04  # they differ
    assert (s["sum_intersection"], s["sum_union"]) == (53, 110)
    # IoU ratios: A 3/5 = 0.6, B 50/100 = 0.5 exactly, C 1, D 0 (thresholds use the exact ratio)
    assert s["precision@0.5"] == 0.75
    assert s["precision@0.6"] == 0.5
    assert s["precision@0.7"] == 0.25
    assert s["precision@0.8"] == 0.25
    assert s["precision@0.9"] == 0.25
    # box IoUs: A 4/6, B (0,0,5,10) vs (0,0,10,10) = 0.5, C both empty 1, D disjoint 0
    assert s["box_iou"] == pytest.approx((4 / 6 + 0.5 + 1.0 + 0.0) / 4, abs=TOL)
    assert s["box_acc@0.5"] == 0.75
    # no-target: C is the only empty target, predicted empty; A, B, D have predictions
    assert (s["n_acc"], s["no_target_count"]) == (1.0, 1)
    assert (s["t_acc"], s["target_count"]) == (1.0, 3)


def test_ciou_all_empty_is_zero_like_lisa_and_n_acc():
    e = np.zeros((2, 2), np.uint8)
    p = np.zeros((2, 2), bool)
    q = p.copy()
    q[0, 0] = True
    s = segmentation_scores([p, q], [e, e])
    assert s["giou"] == pytest.approx(0.5, abs=TOL)
    assert s["ciou"] == 0.0
    assert (s["n_acc"], s["no_target_count"], s["t_acc"], s["target_count"]) == (0.5, 2, None, 0)


def test_custom_thresholds():
    preds, gts = _several()
    s = segmentation_scores(preds, gts, precision_thresholds=(0.25, 0.55), box_thresholds=(0.6, 0.7))
    assert s["precision@0.25"] == 0.75 and s["precision@0.55"] == 0.5
    assert "precision@0.5" not in s
    assert s["box_acc@0.6"] == 0.5 and s["box_acc@0.7"] == 0.25  # A 0.667 passes 0.6 only


def test_error_cases():
    preds, gts = _several()
    with pytest.raises(ValueError, match="empty split"):
        segmentation_scores([], [])
    with pytest.raises(ValueError, match=r"\(20, 20\).*\(3, 5\)"):
        segmentation_scores(preds[:2], [gts[0], gts[2]])
    with pytest.raises(ValueError, match="only 0"):
        mask_iou(np.zeros((2, 2), bool), np.full((2, 2), 2, np.uint8))
    with pytest.raises(ValueError):
        mask_iou(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(ValueError):
        MaskCounts(intersection=3, union=2, pred_box=None, gt_box=None)
    meter = SegmentationMeter(groups=["long"])
    with pytest.raises(ValueError, match="empty split"):
        meter.scores()
    meter.update(preds[0], gts[0])
    with pytest.raises(ValueError, match="empty split"):
        meter.scores("long")
    with pytest.raises(KeyError):
        meter.scores("nope")
    with pytest.raises(ValueError):
        meter.update(preds[0], gts[0], group="a/b")


def _random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(5, 30, size=2)
        gt = (rng.random((h, w)) > rng.random()).astype(np.uint8)
        gt[rng.random((h, w)) > 0.9] = 255
        if i % 7 == 0:
            gt[gt == 1] = 0  # some empty targets
        logits = rng.normal(size=(h, w)) + (gt == 1) * rng.random() * 2
        if i % 5 == 0:
            logits[:] = -1.0  # some empty predictions
        out.append((logits.astype(np.float32), gt, "long" if i % 3 else "short"))
    return out


def test_summed_meter_states_equal_a_single_meter_exactly():
    """Shards in any order, their states summed key by key (as the all-reduce across ranks sums
    them): the same state and scores as one meter over everything."""
    pairs = _random_pairs(40)
    single = SegmentationMeter(groups=("short", "long"))
    for pred, gt, g in pairs:
        single.update(pred, gt, group=g)
    parts = [SegmentationMeter(groups=("short", "long")) for _ in range(3)]
    for i, (pred, gt, g) in enumerate(reversed(pairs)):  # different order, too
        parts[i % 3].update(pred, gt, group=g)
    summed = {key: sum(part.state()[key] for part in parts) for key in single.state()}
    assert summed == single.state()
    for g in (None, "short", "long"):
        assert scores_from_state(summed, g) == single.scores(g)
    # a meter without groups gives the same overall scores, and they match a naive loop
    s = segmentation_scores([p for p, _, _ in pairs], [g for _, g, _ in pairs])
    assert s == single.scores()
    ious, inter, union = [], 0, 0
    for pred, gt, _ in pairs:
        valid = gt != 255
        p, t = (pred > 0) & valid, gt == 1
        i, u = int((p & t).sum()), int((p | t).sum())
        ious.append(1.0 if u == 0 else i / (u + 1e-5))
        inter, union = inter + i, union + u
    assert s["giou"] == pytest.approx(float(np.mean(ious)), abs=TOL)
    assert s["ciou"] == inter / (union + 1e-10)
    assert all(isinstance(v, int) for v in single.state().values())


def test_groups_short_long_overall():
    preds, gts = _several()
    meter = SegmentationMeter()
    for i, (p, g) in enumerate(zip(preds, gts)):
        meter.update(p, g, group="short" if i < 2 else "long")
    assert meter.groups == ["long", "short"]
    assert meter.scores("short")["giou"] == pytest.approx(
        (3 / (5 + 1e-5) + 50 / (100 + 1e-5)) / 2, abs=TOL)
    assert meter.scores("short")["ciou"] == 53 / (105 + 1e-10)
    assert meter.scores("long")["giou"] == pytest.approx(0.5, abs=TOL)
    assert meter.scores("long")["count"] == 2
    assert meter.scores() == segmentation_scores(preds, gts)
    # every update counts towards the overall scores and its group
    assert [meter.scores(g)["count"] for g in meter.groups] == [2, 2] and meter.scores()["count"] == 4
    # one update may count towards several groups
    m2 = SegmentationMeter()
    m2.update(preds[0], gts[0], group=["refcoco", "testA"])
    assert m2.scores("refcoco") == m2.scores("testA") == m2.scores()
    # update_counts with precomputed counts equals update
    m3 = SegmentationMeter()
    m3.update_counts(compute_counts(preds[0], gts[0]), group=["refcoco", "testA"])
    assert m3.state() == m2.state()
    # reset keeps declared groups only
    m4 = SegmentationMeter(groups=["x"])
    m4.update(preds[0], gts[0], group="y")
    m4.reset()
    assert m4.groups == ["x"] and len(m4) == 0


def test_reduce_state_across_ranks(tmp_path):
    preds, gts = _several()
    meter = SegmentationMeter()
    for p, g in zip(preds, gts):
        meter.update(p, g, group="x")
    state = meter.state()
    assert reduce_state_across_ranks(state) == state  # not initialised: no-op copy
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        reduced = reduce_state_across_ranks(state)
    finally:
        dist.destroy_process_group()
    assert reduced == state
    assert scores_from_state(reduced, "x") == meter.scores("x")
