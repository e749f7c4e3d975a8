"""Tests for utils/masks.py: boxes, box IoU, RLE, overlays."""

import json

import numpy as np
import pytest

from utils.masks import (
    DEFAULT_PALETTE,
    box_area,
    box_intersection_union,
    box_iou,
    decode_rle,
    encode_rle,
    foreground,
    mask_to_box,
    overlay_masks,
)


# ----------------------------------------------------------------- mask_to_box


def test_mask_to_box_known_rectangle_exclusive_corner():
    m = np.zeros((8, 10), dtype=bool)
    m[2:5, 3:7] = True  # rows 2..4, cols 3..6
    box = mask_to_box(m)
    assert box == (3, 2, 7, 5)
    x0, y0, x1, y1 = box
    assert (x1 - x0, y1 - y0) == (4, 3)
    assert m[y0:y1, x0:x1].all() and m.sum() == (x1 - x0) * (y1 - y0)
    assert all(type(v) is int for v in box)


def test_mask_to_box_corners_and_single_pixels():
    m = np.zeros((5, 7), dtype=bool)
    m[0, 0] = True
    assert mask_to_box(m) == (0, 0, 1, 1)
    m[:] = False
    m[4, 6] = True
    assert mask_to_box(m) == (6, 4, 7, 5)
    m[1, 2] = True
    assert mask_to_box(m) == (2, 1, 7, 5)


def test_mask_to_box_ignore_255_is_not_foreground():
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[2:4, 2:4] = 1
    gt[0, :] = 255
    gt[:, 5] = 255
    assert mask_to_box(gt) == (2, 2, 4, 4)  # would be (0, 0, 6, 6) if 255 counted
    only_ignore = np.full((3, 3), 255, dtype=np.uint8)
    assert mask_to_box(only_ignore) is None


def test_mask_to_box_empty_and_bad_inputs():
    assert mask_to_box(np.zeros((4, 4), dtype=bool)) is None
    assert mask_to_box(np.zeros((4, 4), dtype=np.uint8)) is None
    with pytest.raises(TypeError):
        mask_to_box(np.zeros((4, 4), dtype=np.float32))  # logits must be thresholded first
    with pytest.raises(ValueError):
        mask_to_box(np.full((4, 4), 2, dtype=np.uint8))  # not 0/1/255
    with pytest.raises(ValueError):
        mask_to_box(np.zeros((1, 4, 4), dtype=bool))  # not 2-D


def test_mask_to_box_accepts_torch():
    torch = pytest.importorskip("torch")
    t = torch.zeros(5, 5, dtype=torch.bool)
    t[1:3, 2:5] = True
    assert mask_to_box(t) == (2, 1, 5, 3)
    assert foreground(torch.tensor([[1, 255], [0, 1]], dtype=torch.uint8)).tolist() == [
        [True, False], [False, True]]


# ----------------------------------------------------------------- box IoU


def test_box_iou_hand_values():
    # a: 4x4 = 16, b: 4x4 = 16, overlap [2,4)x[2,4) = 4 -> union 28 -> 1/7
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)
    assert box_intersection_union((0, 0, 4, 4), (2, 2, 6, 6)) == (4, 28)
    # contained: 2x2 inside 4x4 -> 4/16
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(0.25)
    # touching edges (exclusive corners) do not overlap
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0
    assert box_iou((1, 2, 5, 7), (1, 2, 5, 7)) == 1.0
    # 2x3 vs 3x3 sharing 2x3 -> 6 / 9
    assert box_iou((0, 0, 2, 3), (0, 0, 3, 3)) == pytest.approx(6 / 9)


def test_box_iou_none_rules_and_degenerate():
    assert box_iou(None, None) == 1.0
    assert box_iou((0, 0, 2, 2), None) == 0.0
    assert box_iou(None, (0, 0, 2, 2)) == 0.0
    assert box_area(None) == 0
    assert box_area((3, 3, 2, 5)) == 0
    assert box_iou((2, 2, 2, 2), (2, 2, 2, 2)) == 0.0


# ----------------------------------------------------------------- RLE


def test_rle_round_trip_random_odd_size():
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)) > 0.6
    rle = encode_rle(m)
    assert rle["size"] == [37, 53]
    assert isinstance(rle["counts"], str)
    restored = json.loads(json.dumps(rle))  # JSON-serialisable
    out = decode_rle(restored)
    assert out.dtype == bool and out.shape == (37, 53)
    np.testing.assert_array_equal(out, m)
    # bytes counts are accepted too, and a 0/1 uint8 mask encodes like the bool one
    assert np.array_equal(decode_rle({"size": [37, 53], "counts": rle["counts"].encode()}), m)
    assert encode_rle(m.astype(np.uint8)) == rle


def test_rle_edge_cases_and_uncompressed():
    for m in (np.zeros((3, 1), bool), np.ones((1, 7), bool)):
        np.testing.assert_array_equal(decode_rle(encode_rle(m)), m)
    # uncompressed COCO RLE: column-major runs starting with zeros
    m = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)  # column-major: 0,0 | 1,0 | 1,1
    np.testing.assert_array_equal(decode_rle({"size": [2, 3], "counts": [2, 1, 1, 2]}), m)


def test_encode_rle_rejects_ignore_and_floats():
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[0, 0] = 255
    with pytest.raises(ValueError):
        encode_rle(gt)
    with pytest.raises(TypeError):
        encode_rle(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        decode_rle({"counts": "abc"})


# ----------------------------------------------------------------- overlay


def test_overlay_colours_box_and_no_mutation():
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    img[..., 1] = 40
    m = np.zeros((20, 30), dtype=bool)
    m[5:15, 8:20] = True
    out = overlay_masks(img, [m], alpha=0.5, colors=[(200, 0, 100)], thickness=1)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert img[..., 1].max() == 40 and img[..., 0].max() == 0  # input untouched
    assert tuple(out[10, 12]) == (100, 20, 50)  # interior: 0.5 * image + 0.5 * colour
    assert tuple(out[0, 0]) == (0, 40, 0)  # outside: untouched
    # box outline (exclusive box (8, 5, 20, 15) -> inclusive corners (8, 5)-(19, 14))
    assert tuple(out[5, 8]) == (200, 0, 100)
    assert tuple(out[14, 19]) == (200, 0, 100)
    assert tuple(out[15, 20]) == (0, 40, 0)


def test_overlay_two_masks_distinct_colours_and_options():
    img = np.full((16, 16, 3), 100, dtype=np.uint8)
    a = np.zeros((16, 16), dtype=np.uint8)
    a[2:6, 2:6] = 1
    b = np.zeros((16, 16), dtype=bool)
    b[9:14, 9:14] = True
    out = overlay_masks(img, [a, b], alpha=1.0, boxes=False)
    assert tuple(out[3, 3]) == DEFAULT_PALETTE[0]
    assert tuple(out[10, 10]) == DEFAULT_PALETTE[1]
    assert DEFAULT_PALETTE[0] != DEFAULT_PALETTE[1]
    # explicit boxes, one None; labels
    out2 = overlay_masks(img, [a, b], alpha=0.0, boxes=[(0, 0, 16, 16), None],
                         colors=[(1, 2, 3)], labels=["a", None], thickness=1)
    assert tuple(out2[15, 15]) == (1, 2, 3)  # explicit box drawn, colours cycle
    assert tuple(out2[8, 8]) == (100, 100, 100)
    # nothing to draw
    np.testing.assert_array_equal(overlay_masks(img, []), img)


def test_overlay_errors():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        overlay_masks(img, [np.zeros((8, 9), bool)])
    with pytest.raises(ValueError):
        overlay_masks(img.astype(np.float32), [np.zeros((8, 8), bool)])
    with pytest.raises(ValueError):
        overlay_masks(img, [np.zeros((8, 8), bool)], boxes=[])
