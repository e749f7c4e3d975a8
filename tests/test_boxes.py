"""Boxes as answers: detection metrics, COCO AP against COCOeval, [SEG] labels, mask scores,
the COCO-format detection split, and test.py's box table and detections file."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from test_eval import env, results_by_key, synthetic_root  # noqa: F401 - synthetic_root is a fixture
from utils.grounding import answer_objects, coco_results, seg_labels
from utils.masks import box_iou, decode_rle, encode_rle, mask_score, mask_to_box
from utils.metrics import (
    DETECTION_IOU_THRESHOLD,
    DetectionMeter,
    coco_average_precision,
    match_boxes,
)


def detection_scores(pred_boxes, gt_boxes, thresholds=(DETECTION_IOU_THRESHOLD,)):
    """The detection scores of answers: a meter fed with them in order, as evaluation feeds it."""
    meter = DetectionMeter(thresholds)
    for preds, gts in zip(pred_boxes, gt_boxes, strict=True):
        meter.update(preds, gts)
    return meter.scores()


# --------------------------------------------------------------------------- matching and detection scores


def test_match_boxes_hand_computed_cases():
    a, b = (0, 0, 10, 10), (0, 0, 10, 20)  # IoU exactly 100 / 200 = 0.5: a true positive
    match = match_boxes([a], [b])
    assert match.pairs == ((0, 0, 0.5),) and match.true_positives(0.5) == 1 and match.exact()
    assert match.true_positives(0.51) == 0 and not match.exact(0.51)
    # No prediction: nothing matched, the target missed.
    none = match_boxes([], [a])
    assert (none.pairs, none.num_predictions, none.num_targets, none.true_positives()) == ((), 0, 1, 0)
    # No target: every prediction is a false positive; an empty answer to a no-target request is exact.
    assert match_boxes([a], []).num_predictions == 1 and not match_boxes([a], []).exact()
    assert match_boxes([], []).exact() and match_boxes([None], []).exact()  # an empty mask is no box
    # More predictions than targets: the best one is matched, the others are false positives.
    more = match_boxes([(50, 50, 60, 60), (0, 0, 10, 20), a], [a])
    assert more.pairs == ((2, 0, 1.0),) and more.num_predictions == 3 and more.true_positives() == 1


def test_matching_maximises_the_summed_iou_not_greedy():
    # 1-D intervals of height 10: IoU(P1,T1) = 9/11, IoU(P1,T2) = 8/12, IoU(P2,T1) = 7/13, IoU(P2,T2) = 4/16.
    t1, t2 = (10, 0, 20, 10), (13, 0, 23, 10)
    p1, p2 = (11, 0, 21, 10), (7, 0, 17, 10)
    assert [box_iou(p1, t1), box_iou(p1, t2), box_iou(p2, t1), box_iou(p2, t2)] == [9 / 11, 8 / 12, 7 / 13, 4 / 16]
    # Greedy (best pair first) would take P1-T1 and leave P2-T2 at 0.25: one hit. The assignment
    # maximising the summed IoU (8/12 + 7/13 > 9/11 + 4/16) finds both.
    match = match_boxes([p1, p2], [t1, t2])
    assert sorted(match.pairs) == [(0, 1, 8 / 12), (1, 0, 7 / 13)]
    assert match.true_positives() == 2 and match.exact()


def test_detection_scores_over_a_split_hand_computed():
    a, b, far = (0, 0, 10, 10), (20, 20, 30, 30), (100, 100, 110, 110)
    half = (0, 0, 10, 20)  # IoU 0.5 with a
    answers = [
        ([a, b], [a, b]),            # 2 TP
        ([], [a]),                   # no prediction: 1 miss
        ([far], []),                 # no target: 1 FP
        ([half, far, None], [a]),    # more predictions than targets: 1 TP (IoU 0.5), 1 FP; None is no box
        ([], []),                    # no target, no prediction: exact
    ]
    scores = detection_scores([p for p, _ in answers], [t for _, t in answers])
    assert (scores["answers"], scores["predictions"], scores["targets"], scores["true_positives@0.5"]) == (5, 5, 4, 3)
    assert scores["precision@0.5"] == 3 / 5 and scores["recall@0.5"] == 3 / 4
    assert scores["f1@0.5"] == 2 * 3 / (5 + 4)
    assert scores["matched"] == 3 and scores["matched_iou"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-12)
    assert scores["exact@0.5"] == 2 / 5
    # Degenerate splits: undefined ratios are None, not 0 or 1.
    nothing = detection_scores([[]], [[a]])
    assert nothing["precision@0.5"] is None and nothing["recall@0.5"] == 0.0 and nothing["f1@0.5"] == 0.0
    assert nothing["matched_iou"] is None and nothing["exact@0.5"] == 0.0
    no_target = detection_scores([[a]], [[]])
    assert no_target["precision@0.5"] == 0.0 and no_target["recall@0.5"] is None and no_target["f1@0.5"] == 0.0
    empty = detection_scores([[]], [[]])
    assert empty["precision@0.5"] is None and empty["recall@0.5"] is None and empty["f1@0.5"] is None
    assert empty["exact@0.5"] == 1.0


def test_detection_meter_states_add_up_exactly():
    rng = np.random.default_rng(0)

    def box():
        x, y = rng.integers(0, 50, 2)
        return (int(x), int(y), int(x + rng.integers(1, 30)), int(y + rng.integers(1, 30)))

    answers = [([box() for _ in range(rng.integers(0, 4))], [box() for _ in range(rng.integers(0, 3))]) for _ in range(40)]
    whole = DetectionMeter()
    halves = [DetectionMeter(), DetectionMeter()]
    for index, (preds, gts) in enumerate(answers):
        whole.update(preds, gts)
        halves[index % 2].update(preds, gts)
    summed = {k: halves[0].state()[k] + halves[1].state()[k] for k in whole.state()}
    assert summed == whole.state()


# --------------------------------------------------------------------------- COCO AP


def _rle(mask):
    return encode_rle(mask)


def _box_mask(height, width, box):
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def coco_files(tmp_path):
    """A small ground truth (3 images, 2 categories, a crowd region) and detections with
    misses, false positives, shifted boxes and masks, as files."""
    rng = np.random.default_rng(3)
    images = [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in (1, 2, 3)]
    annotations, detections = [], []
    next_id = 1
    for image in images:
        for category in (1, 2):
            for _ in range(int(rng.integers(0, 3))):
                x, y = (int(v) for v in rng.integers(0, 50, 2))
                box = (x, min(y, 40), x + int(rng.integers(8, 30)), min(y, 40) + int(rng.integers(8, 20)))
                mask = _box_mask(60, 80, box)
                annotations.append({"id": next_id, "image_id": image["id"], "category_id": category,
                                    "segmentation": _rle(mask), "area": int(mask.sum()),
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0})
                next_id += 1
                if rng.random() < 0.8:  # found, more or less well
                    shift = int(rng.integers(-4, 5))
                    found = (max(0, box[0] + shift), box[1], min(80, box[2] + shift), box[3])
                    mask = _box_mask(60, 80, found)
                    detections.append({"image_id": image["id"], "category_id": category,
                                       "bbox": [found[0], found[1], found[2] - found[0], found[3] - found[1]],
                                       "score": float(rng.random()), "segmentation": _rle(mask)})
            if rng.random() < 0.5:  # a false positive
                mask = _box_mask(60, 80, (0, 0, 10, 10))
                detections.append({"image_id": image["id"], "category_id": category, "bbox": [0, 0, 10, 10],
                                   "score": float(rng.random()), "segmentation": _rle(mask)})
    crowd = _box_mask(60, 80, (60, 40, 80, 60))
    annotations.append({"id": next_id, "image_id": 3, "category_id": 1, "segmentation": _rle(crowd),
                        "area": int(crowd.sum()), "bbox": [60, 40, 20, 20], "iscrowd": 1})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    return tmp_path / "gt.json", tmp_path / "dets.json"


def cocoeval_directly(gt_path, dets_path, iou_type, image_ids=None):
    """pycocotools alone, as anyone would re-score a detections file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(dets_path)), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:3].tolist()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_ap_is_cocoeval_on_the_same_files(coco_files, iou_type):
    gt, dets = coco_files
    ours = coco_average_precision(str(gt), str(dets), iou_type)
    direct = cocoeval_directly(gt, dets, iou_type)
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == direct
    assert 0.0 < ours["AP"] < ours["AP50"] <= 1.0  # a non-trivial case
    # A subset of the images, as after --max_samples.
    ours = coco_average_precision(str(gt), str(dets), iou_type, image_ids=[1, 3])
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == cocoeval_directly(gt, dets, iou_type, [1, 3])


def _one_box_gt(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 120},
                     {"id": 2, "file_name": "b.png", "height": 100, "width": 120}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000,
                           "iscrowd": 0, "segmentation": _rle(_box_mask(100, 120, (0, 0, 100, 100)))}],
          "categories": [{"id": 1, "name": "box"}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(gt))
    return path


def _det(box, score, image_id=1):
    x0, y0, x1, y1 = box
    return {"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
            "segmentation": _rle(_box_mask(100, 120, box))}


def test_coco_ap_hand_computed_cases(tmp_path):
    gt = _one_box_gt(tmp_path)
    # One target, one detection at IoU 0.62: a hit at IoU thresholds 0.50, 0.55, 0.60 of the ten.
    # (COCOeval averages 101 recall points: 1.0 comes out as 0.9999999999999999.)
    ap = coco_average_precision(gt, [_det((0, 0, 100, 62), 0.9)], "bbox")
    assert ap == pytest.approx({"AP": 0.3, "AP50": 1.0, "AP75": 0.0}, abs=1e-12)
    # No prediction: AP 0 (there is something to find).
    assert coco_average_precision(gt, [], "bbox") == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    # No target in the scored images: nothing to score.
    assert coco_average_precision(gt, [_det((0, 0, 10, 10), 0.9, image_id=2)], "bbox", image_ids=[2]) == {
        "AP": None, "AP50": None, "AP75": None}
    # More predictions than targets: a false positive scored below the hit costs nothing ...
    exact = _det((0, 0, 100, 100), 0.8)
    assert coco_average_precision(gt, [exact, _det((105, 0, 120, 10), 0.5)], "segm")["AP"] == pytest.approx(1.0)
    # ... above it, precision is 1/2 at every recall.
    assert coco_average_precision(gt, [exact, _det((105, 0, 120, 10), 0.9)], "segm")["AP"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="iou_type"):
        coco_average_precision(gt, [], "keypoints")


# --------------------------------------------------------------------------- labels, scores, objects


@pytest.mark.parametrize("text, labels", [
    ("It is [SEG].", [None]),
    ("Sure, [SEG].", [None]),
    ("Sure, the segmentation result is [SEG].", [None]),
    ("It is [SEG] and [SEG].", [None, None]),
    ("the red car [SEG]", ["the red car"]),
    ("The red car [SEG] and the blue circle [SEG].", ["The red car", "the blue circle"]),
    ("[SEG] (red car)", ["red car"]),
    ("[SEG] (red car) and [SEG] (blue  circle)", ["red car", "blue circle"]),
    ("the dog [SEG] (a puppy)", ["a puppy"]),  # the parenthesis wins
    ("Here is the red car [SEG].", ["the red car"]),
    ("1. red car: [SEG]\n2. **blue circle**: [SEG]", ["red car", "blue circle"]),
    ("[SEG] ()", [None]),
    ("There is no such object in this image.", []),
])
def test_seg_labels(text, labels):
    assert seg_labels(text) == labels


def test_mask_score_is_the_mean_probability_inside_the_mask():
    logits = np.array([[2.0, -1.0], [0.0, 1.0]])
    expected = (1 / (1 + np.exp(-2.0)) + 1 / (1 + np.exp(-1.0))) / 2  # 0 is not inside (logit > 0)
    assert mask_score(logits) == pytest.approx(expected, abs=1e-12)
    assert mask_score(torch.tensor(logits, dtype=torch.float32)) == pytest.approx(expected, abs=1e-6)
    assert mask_score(np.full((3, 3), -0.5)) is None and mask_score(torch.zeros(2, 2)) is None
    # The same mask, surer logits: a higher score.
    assert mask_score(logits * 3) > mask_score(logits)


def test_answer_objects_and_coco_results():
    first = _box_mask(40, 60, (5, 6, 25, 16))
    empty = np.zeros((40, 60), bool)
    objects = answer_objects("the red car [SEG] and nothing [SEG].", [first, empty], [0.8, None])
    assert objects[0]["bbox_2d"] == [5, 6, 25, 16] and objects[0]["label"] == "the red car"
    assert objects[0]["score"] == 0.8 and objects[0]["area"] == 200
    assert np.array_equal(decode_rle(objects[0]["mask"]), first)
    assert objects[1] == {"bbox_2d": None, "label": "nothing", "score": None, "area": 0, "mask": encode_rle(empty)}
    # COCO results: one record per non-empty mask, bbox [x, y, w, h] = pycocotools' own box of the RLE.
    from pycocotools import mask as mask_util

    records = coco_results(7, 3, [first, empty], [0.8, None])
    assert len(records) == 1 and records[0]["image_id"] == 7 and records[0]["category_id"] == 3
    rle = dict(records[0]["segmentation"], counts=records[0]["segmentation"]["counts"].encode())
    assert records[0]["bbox"] == [5, 6, 20, 10] == mask_util.toBbox(rle).tolist()


# --------------------------------------------------------------------------- the COCO-format split


@pytest.fixture
def coco_root(tmp_path):
    """A COCO-format root: 2 images, categories cat (2 instances + a crowd in image 1) and dog
    (image 2 only), and a category with no instance at all."""
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "images" / name)

    def poly(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    content = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50},
                   {"id": 2, "file_name": "b.png", "height": 40, "width": 50}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": poly(2, 2, 12, 12), "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": poly(20, 5, 30, 25), "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": poly(35, 30, 48, 38), "iscrowd": 1},
            {"id": 21, "image_id": 2, "category_id": 2, "segmentation": poly(5, 5, 40, 30), "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "traffic_light"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(content))
    return tmp_path


def test_coco_detection_split_asks_every_category_instance_by_instance(coco_root):
    from utils.data.builders import build_val_dataset, val_split_kind

    name = "coco|instances.json|images"
    assert val_split_kind(name) == "coco"
    data = build_val_dataset(name, str(coco_root))
    assert data.items == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert data.image_items() == {1: [0, 1, 2], 2: [3, 4, 5]}
    cats = data[0]
    assert cats.turns == [("Please segment all the cat in this image.", "[SEG] and [SEG].")]
    assert cats.requests == ["cat"] and cats.meta["coco_image_id"] == 1 and cats.meta["coco_category_id"] == 1
    assert len(cats.masks) == 2 and cats.meta["no_target"] == [False]
    assert mask_to_box(cats.masks[0]) == (2, 2, 12, 12) and mask_to_box(cats.masks[1]) == (20, 5, 30, 25)
    assert (cats.masks[0][30:, 35:] == 255).any() and (cats.masks[1][30:, 35:] == 255).any()  # the crowd: ignore
    absent = data[1]  # no dog in image 1: a no-target item
    assert absent.masks == [] and absent.meta["no_target"] == [True] and "[SEG]" not in absent.turns[0][1]
    assert data[2].requests == ["traffic light"]
    present = build_val_dataset(name + "|present", str(coco_root))
    assert present.items == [(1, 1), (2, 2)]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_val_dataset("coco|nope.json|images", str(coco_root))
    with pytest.raises(ValueError, match="coco\\|<instances.json>\\|<image_dir>"):
        build_val_dataset("coco|instances.json", str(coco_root))


def test_grefcoco_targets_are_instance_boxes(synthetic_root):  # noqa: F811
    from utils.data.builders import build_val_dataset
    from utils.evaluation import detection_targets, question_infos

    data = build_val_dataset("synthetic|grefer_val", str(synthetic_root))
    several = next(data[i] for i in range(len(data)) if len(data[i].meta["target_boxes"][0]) > 1)
    info = question_infos(several.turns, several.requests, several.meta)[0]
    boxes = detection_targets(info, several.masks)
    assert len(boxes) > 1 and len(several.masks) == 1  # one union mask, one box per object named
    x0, y0, x1, y1 = mask_to_box(several.masks[0])  # the union's box holds every instance box
    assert all(x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1 for b in boxes)
    assert [x0, y0, x1, y1] == [min(b[0] for b in boxes), min(b[1] for b in boxes),
                                max(b[2] for b in boxes), max(b[3] for b in boxes)]


def test_oracle_answers_score_one_and_empty_answers_zero(coco_root):
    """The scorer, the COCO results records and COCOeval together, on the real file."""
    from utils.data.builders import build_val_dataset
    from utils.evaluation import GENERATE, SplitScorer, question_infos

    data = build_val_dataset("coco|instances.json|images", str(coco_root))
    for oracle in (True, False):
        detections = []
        scorer = SplitScorer(GENERATE, on_detections=detections.extend)
        for index in range(len(data)):
            sample = data[index]
            [info] = question_infos(sample.turns, sample.requests, sample.meta)
            preds = [m == 1 for m in sample.masks] if oracle else []
            scorer.add_question({"index": index, "meta": sample.meta}, info, preds, sample.masks, "",
                                sample.image.shape[:2], pred_scores=[0.9] * len(preds))
        result = scorer.result()
        ap = {t: coco_average_precision(data.annotation_file, detections, t) for t in ("bbox", "segm")}
        detection = result["detection"]
        if oracle:
            assert len(detections) == 3 and result["precision@0.9"] == 1.0
            assert detection["precision@0.5"] == detection["recall@0.5"] == detection["f1@0.5"] == 1.0
            assert detection["exact@0.5"] == 1.0 and detection["matched_iou"] == 1.0
            assert ap["bbox"] == ap["segm"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, abs=1e-12)
        else:
            assert detections == [] and detection["recall@0.5"] == 0.0 and detection["precision@0.5"] is None
            assert detection["exact@0.5"] == 4 / 6  # the four no-target items answered with nothing
            assert ap["bbox"] == ap["segm"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


# --------------------------------------------------------------------------- test.py end to end

FORCE = """
import sys
sys.path[:0] = [".", "tests"]
from model.segmenter import ReasonSegmenter
from test_eval import forced
_generate = ReasonSegmenter.generate
def generate(self, batch, max_new_tokens=64, **kwargs):
    return _generate(self, batch, max_new_tokens=max_new_tokens, **forced(self, {answer!r}), **kwargs)
ReasonSegmenter.generate = generate
"""


def run_forced(args, answer, timeout=300):
    """An entry point as a subprocess, with the model forced to give ``answer`` (a random tiny
    model rarely says [SEG] by itself)."""
    code = FORCE.format(answer=answer) + (
        f"import runpy\nsys.argv = {list(map(str, args))!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def coco_val_file(synthetic_root, tmp_path_factory):  # noqa: F811
    """The synthetic root's first 4 val scenes as a COCO-format file (several shapes of a kind)."""
    content = json.loads((synthetic_root / "refer_seg" / "refcoco" / "instances.json").read_text())
    refs = __import__("pickle").loads((synthetic_root / "refer_seg" / "refcoco" / "refs(unc).p").read_bytes())
    keep = sorted({ref["image_id"] for ref in refs if ref["split"] == "val"})[:4]
    content["images"] = [image for image in content["images"] if image["id"] in keep]
    content["annotations"] = [ann for ann in content["annotations"] if ann["image_id"] in keep]
    path = tmp_path_factory.mktemp("coco_val") / "instances_val.json"
    path.write_text(json.dumps(content))
    return path


def test_test_py_scores_boxes_and_writes_a_detections_file(tiny_segmenter_dir, synthetic_root, coco_val_file, tmp_path):  # noqa: F811
    from utils.eval_report import rescore_predictions

    coco_split = f"coco|{coco_val_file}|refer_seg/images/mscoco/images/train2014"
    result = run_forced(
        ["test.py", "--version", tiny_segmenter_dir(), "--dataset_dir", synthetic_root,
         "--val_dataset", f"{coco_split}||synthetic|grefer_val", "--protocol", "both", "--max_new_tokens", "12",
         "--workers", "0", "--no_progress", "--log_dir", tmp_path, "--save_predictions", tmp_path / "preds.jsonl",
         "--save_detections", tmp_path / "dets" / "mine.json"],
        "the shape [SEG] and the other [SEG].",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    results = results_by_key(report)
    assert "detection" in report["metric_definitions"] and "coco_ap" in report["metric_definitions"]
    assert "detection" not in results[(coco_split, "teacher_forced")]  # teacher forcing gives the count away
    coco = results[(coco_split, "generate")]
    assert coco["counts"]["split_items"] == 16  # 4 images x 4 categories
    detection = coco["detection"]
    assert detection["answers"] == 16 and detection["targets"] == sum(
        1 for ann in json.loads(coco_val_file.read_text())["annotations"])
    assert 0 < detection["predictions"] <= 32
    # The detections file is COCO results format; pycocotools alone gives the report's AP.
    detections_file = tmp_path / "dets" / "mine.json"
    detections = json.loads(detections_file.read_text())
    assert coco["coco_ap"]["detections"] == len(detections) == detection["predictions"]
    assert coco["coco_ap"]["images"] == 4 and coco["coco_ap"]["detections_file"] == str(detections_file)
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    for iou_type in ("bbox", "segm"):
        direct = cocoeval_directly(coco_val_file, detections_file, iou_type)
        assert [coco["coco_ap"][iou_type][k] for k in ("AP", "AP50", "AP75")] == direct
    # Each detection's box is its mask's box; its score is the mask's mean probability (not constant).
    for det in detections:
        x0, y0, x1, y1 = mask_to_box(decode_rle(det["segmentation"]))
        assert det["bbox"] == [x0, y0, x1 - x0, y1 - y0] and 0.5 < det["score"] <= 1.0
    assert len({round(det["score"], 9) for det in detections}) > 1
    # gRefCOCO: detection targets are the objects an expression names (one union mask, several boxes).
    grefer = results[("synthetic|grefer_val", "generate")]
    assert grefer["detection"]["targets"] > grefer["metrics"]["target_count"] and "coco_ap" not in grefer
    # The saved predictions re-score to the same detection numbers.
    rescored = rescore_predictions(tmp_path / "preds.jsonl")
    for key, entry in results.items():
        assert rescored[key].get("detection") == entry.get("detection"), key
    # The table: a second block with the box columns, COCO AP only on the COCO split.
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("split") and "boxP@0.5" in line)
    for column in ("answers", "boxes", "targets", "boxR@0.5", "boxF1@0.5", "matchIoU", "F1=1", "boxAP", "maskAP"):
        assert column in lines[header]
    coco_row, grefer_row = lines[header + 2].split(), lines[header + 3].split()
    assert coco_row[:4] == [coco_split, "16", str(detection["predictions"]), str(detection["targets"])]
    assert grefer_row[0] == "synthetic|grefer_val" and grefer_row[-6:] == ["-"] * 6
    assert f"COCO AP over 4 images, {len(detections)} detections" in result.stdout


def test_save_detections_needs_a_coco_split_and_generation(tiny_segmenter_dir, synthetic_root, coco_val_file, tmp_path):  # noqa: F811
    from utils.eval_cli import parse_args

    base = ["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(synthetic_root),
            "--save_detections", str(tmp_path / "d.json")]
    with pytest.raises(SystemExit):
        parse_args(base + ["--val_dataset", "synthetic|val", "--protocol", "generate"])
    with pytest.raises(SystemExit):
        parse_args(base + ["--val_dataset", f"coco|{coco_val_file}|x", "--protocol", "teacher_forced"])
    result = subprocess.run([sys.executable, "test.py", *base, "--val_dataset", "synthetic|val"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--save_detections needs a COCO-format split" in result.stderr


def test_generation_encodes_an_image_once_per_batch(coco_root, tiny_segmenter_dir):
    """A COCO-format split asks about each category of an image as its own item: a batch of them
    runs both encoders once per image file, and scores exactly as one item at a time."""
    from model.image_cache import find_vision_tower
    from model.loading import load_segmenter
    from test_eval import forced
    from utils.data.builders import build_val_dataset
    from utils.evaluation import GENERATE, evaluate

    model = load_segmenter(tiny_segmenter_dir(), precision="fp32", device="cpu")
    data = build_val_dataset("coco|instances.json|images", str(coco_root))  # 2 images x 3 categories
    sam_images, vision_images = [], []
    hooks = [
        model.sam.image_encoder.register_forward_hook(lambda _m, args, _o: sam_images.append(len(args[0]))),
        find_vision_tower(model.vlm).register_forward_hook(
            lambda _m, args, kwargs, _o: vision_images.append(len(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))),
            with_kwargs=True),
    ]
    runs = {}
    try:
        for batch_size in (1, 3):
            sam_images.clear(), vision_images.clear()
            records = []
            scores = evaluate(model, data, GENERATE, batch_size=batch_size, show_progress=False, max_new_tokens=6,
                              generate_kwargs=forced(model, "[SEG]."), on_prediction=records.append)
            runs[batch_size] = (scores, records, sum(sam_images), sum(vision_images))
    finally:
        for hook in hooks:
            hook.remove()
    (alone, alone_records, alone_sam, alone_vision), (merged, merged_records, merged_sam, merged_vision) = runs[1], runs[3]
    assert (alone_sam, alone_vision) == (6, 6)
    assert (merged_sam, merged_vision) == (2, 2)  # a.png and b.png (same pixels, different files)
    for key in ("count", "sum_intersection", "sum_union", "giou", "ciou", "n_acc", "t_acc"):
        assert merged[key] == pytest.approx(alone[key], abs=1e-9), key
    assert merged["detection"] == alone["detection"]
    assert [(r["index"], r["answer"], r["num_seg"]) for r in merged_records] == [
        (r["index"], r["answer"], r["num_seg"]) for r in alone_records]
