"""The demo's pictures (tools/demo_figures.py) and its last request and line (tools/demo.py), on
a small synthetic dataset and files written here: the 10-minute demo itself is not run."""

import json
import random

import cv2
import numpy as np
import pytest
from PIL import Image

from tools.demo import OBVIOUS_REQUEST, headline, held_out_request, shape_colours
from tools.demo_figures import (
    CURVE_SIZE_PX, PANEL_HEIGHT_PX, PANEL_WIDTH_PX, SUMMARY_COLUMNS, SUMMARY_MARGIN_PX, FigureInputError,
    draw_curve, draw_summary, main, read_metrics, select_requests,
)
from utils.data.synthetic_writer import write_synthetic_dataset
from utils.masks import encode_rle, mask_to_box

NUM_VAL = 10


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_figures")
    write_synthetic_dataset(str(root), seed=0, num_train=1, num_val=NUM_VAL)
    return root


def iou(pred, gt):
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def prediction_record(split, protocol, index, image_path, request, pred_masks, gt):
    """One line as test.py --save_predictions writes it (the keys the summary reads)."""
    return {
        "split": split, "protocol": protocol, "index": index, "turn": 0, "dataset": "reason_seg",
        "image_path": str(image_path), "request": request, "question": f"What is {request}?",
        "reference_answer": "[SEG].", "answer": "It is [SEG]." if pred_masks else "I do not know.",
        "no_target": False, "expected_seg": 1, "num_seg": len(pred_masks), "groups": ["short"],
        "pred_masks": [{"rle": encode_rle(m), "box": list(mask_to_box(m) or [])} for m in pred_masks],
        "targets": [{"gt_rle": encode_rle(gt), "ignore_rle": None, "iou": iou(pred_masks[0] if pred_masks else
                     np.zeros_like(gt), gt), "pred_box": None, "gt_box": list(mask_to_box(gt))}],
    }


@pytest.fixture(scope="module")
def predictions(synthetic_root, tmp_path_factory):
    """Predictions for every held-out scene under both protocols, in shuffled order: under generate
    scene i's mask is its target shifted by 6*i pixels (scene 3 gets no mask); a second split too."""
    val = sorted((synthetic_root / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))
    assert len(val) == NUM_VAL
    records = []
    for index, annotation_file in enumerate(val):
        annotation = json.loads(annotation_file.read_text())
        gt = np.zeros((annotation["imageHeight"], annotation["imageWidth"]), np.uint8)
        cv2.fillPoly(gt, [np.round(np.array(annotation["shapes"][0]["points"])).astype(np.int32)], 1)
        gt = gt.astype(bool)
        image = annotation_file.with_suffix(".jpg").relative_to(synthetic_root)  # relative to the root
        shifted = np.roll(gt, 6 * index, axis=1)
        generated = [] if index == 3 else [shifted]
        request = annotation["text"][0]
        records.append(prediction_record("synthetic|val", "generate", index, image, request, generated, gt))
        records.append(prediction_record("synthetic|val", "teacher_forced", index, image, request, [gt], gt))
        records.append(prediction_record("other|val", "generate", index, image, "another split", [gt], gt))
    random.Random(0).shuffle(records)
    path = tmp_path_factory.mktemp("predictions") / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_selection_is_the_first_eight_of_the_first_split_under_generate(predictions):
    path, records = predictions
    chosen = select_requests(records)
    assert [(r["split"], r["protocol"], r["index"]) for r in chosen] == [
        ("synthetic|val", "generate", i) for i in range(8)
    ]
    # Not the best ones: scene 3 (no mask, IoU 0) is in, scenes 8 and 9 are out whatever their scores.
    assert min(r["targets"][0]["iou"] for r in chosen) == 0.0
    assert [r["index"] for r in select_requests(records, count=3, split="other|val")] == [0, 1, 2]
    assert select_requests(records, protocol="nonsense") == []


def test_summary_grid_is_drawn_at_its_size(predictions, synthetic_root, tmp_path):
    path, _ = predictions
    out = draw_summary(path, tmp_path / "demo" / "summary.png", image_root=synthetic_root)
    assert out == tmp_path / "demo" / "summary.png" and out.is_file()
    assert out.stat().st_size < 400_000
    pixels = png(out)
    rows = 2  # 8 panels in rows of 4
    assert pixels.shape == (rows * PANEL_HEIGHT_PX + SUMMARY_MARGIN_PX, SUMMARY_COLUMNS * PANEL_WIDTH_PX, 3)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not blank
    # The predicted masks are filled in magenta (blended half over the shapes and background).
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    assert ((r - g > 60) & (b - g > 60)).sum() > 1000
    # Fewer requests: fewer rows.
    small = png(draw_summary(path, tmp_path / "three.png", image_root=synthetic_root, count=3))
    assert small.shape == (PANEL_HEIGHT_PX + SUMMARY_MARGIN_PX, SUMMARY_COLUMNS * PANEL_WIDTH_PX, 3)


def test_bad_predictions_files_are_named(predictions, synthetic_root, tmp_path):
    path, records = predictions
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FigureInputError, match="nowhere.jsonl does not exist"):
        draw_summary(missing, tmp_path / "x.png")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(FigureInputError, match=r"garbage.jsonl, line 2: not JSON"):
        draw_summary(garbage, tmp_path / "x.png")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"image": "a.jpg", "prompt": "hello"}\n')
    with pytest.raises(FigureInputError, match=r"foreign.jsonl, record 1: missing split.*--save_predictions"):
        draw_summary(foreign, tmp_path / "x.png")
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in records if r["protocol"] == "teacher_forced"))
    with pytest.raises(FigureInputError, match=r"teacher.jsonl has no generate record; it holds synthetic\|val "
                                               r"\(teacher_forced\)"):
        draw_summary(teacher, tmp_path / "x.png", image_root=synthetic_root)
    with pytest.raises(FigureInputError, match="predictions.jsonl: image .* not found"):
        draw_summary(path, tmp_path / "x.png", image_root=tmp_path)  # the wrong dataset root
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit, match="error: predictions file .*nowhere.jsonl does not exist"):
        main(["summary", str(missing), str(tmp_path / "x.png")])


def write_metrics(path, steps=60, val_every=20, resumed_at=40):
    """metrics.jsonl as the trainer writes it: train records each step, val records for two
    protocols, and a resume that logs steps from ``resumed_at`` again."""
    lines = []
    for step in list(range(1, steps + 1)) + list(range(resumed_at, steps + 1)):
        lines.append({"kind": "train", "step": step, "loss": 8.0 * 0.97 ** step, "lr": 1e-4})
        if step % val_every == 0:
            for protocol, scale in (("teacher_forced", 1.0), ("generate", 0.9)):
                lines.append({"kind": "val", "step": step, "protocol": protocol, "split": "synthetic|val",
                              "giou": scale * step / (steps + 10), "count": 100})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_curve_has_loss_and_giou_by_step(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    train, val = read_metrics(metrics)
    assert [step for step, _ in train] == list(range(1, 61))  # resumed steps counted once
    assert set(val) == {"synthetic|val (teacher_forced)", "synthetic|val (generate)"}
    assert [step for step, _ in val["synthetic|val (generate)"]] == [20, 40, 60]
    out = draw_curve(metrics, tmp_path / "curve.png")
    pixels = png(out)
    assert pixels.shape == (CURVE_SIZE_PX[1], CURVE_SIZE_PX[0], 3)
    assert pixels.std() > 10 and out.stat().st_size < 400_000
    # Training records only (a run stopped before its first validation): still drawn.
    only_train = tmp_path / "train_only.jsonl"
    only_train.write_text("".join(l for l in metrics.read_text().splitlines(True) if '"train"' in l))
    assert png(draw_curve(only_train, tmp_path / "train_only.png")).shape == pixels.shape


def test_bad_metrics_files_are_named(tmp_path):
    with pytest.raises(FigureInputError, match="metrics file .*absent.jsonl does not exist"):
        draw_curve(tmp_path / "absent.jsonl", tmp_path / "c.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"kind": "eval_only"}\n')
    with pytest.raises(FigureInputError, match="empty.jsonl has no training loss and no validation gIoU"):
        draw_curve(empty, tmp_path / "c.png")


def test_last_request_names_a_colour_and_a_shape_on_a_scene_with_several(synthetic_root):
    image, question, request = held_out_request(synthetic_root)
    assert image.parent == synthetic_root / "reason_seg" / "ReasonSeg" / "val" and image.is_file()
    match = OBVIOUS_REQUEST.match(request)
    assert match and request.startswith("the ") and request in question
    colours = shape_colours(png(image))
    assert len(colours) >= 2 and match["colour"] in colours
    assert held_out_request(synthetic_root) == (image, question, request)  # deterministic
    # The rule is "the first such scene": every earlier scene lacks a colour-and-shape query or
    # shows a single shape.
    for earlier in sorted(image.parent.glob("*.json")):
        if earlier.with_suffix(".jpg") == image:
            break
        texts = json.loads(earlier.read_text())["text"]
        assert not any(OBVIOUS_REQUEST.match(t.lower()) for t in texts) or len(
            shape_colours(png(earlier.with_suffix(".jpg")))) < 2


def test_headline_says_generated_giou_count_and_pictures(tmp_path):
    results = [
        {"split": "synthetic|val", "protocol": "teacher_forced", "metrics": {"giou": 0.51},
         "counts": {"questions": 100}},
        {"split": "synthetic|val", "protocol": "generate", "metrics": {"giou": 0.504}, "counts": {"questions": 100}},
    ]
    line = headline(results, tmp_path / "summary.png", tmp_path / "curve.png")
    assert "\n" not in line
    assert line.startswith("held-out gIoU 0.504 (generate") and "over 100 requests of synthetic|val" in line
    assert str(tmp_path / "summary.png") in line and str(tmp_path / "curve.png") in line


def test_demo_draws_both_pictures_and_ends_with_the_headline(predictions, synthetic_root, tmp_path, monkeypatch,
                                                            capsys):
    """tools/demo.py's wiring with every entry point faked (the real run takes 10 minutes): test.py
    is asked to save predictions, both pictures are drawn, and the last line says where they are."""
    import shutil

    import tools.demo as demo

    out = tmp_path / "demo_out"
    shutil.copytree(synthetic_root, out / "data")  # the dataset step is skipped
    (out / "tiny_model").mkdir(parents=True)
    (out / "tiny_model" / "config.json").write_text("{}")  # so is the model step
    predictions_file, _ = predictions
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        if "train_ddp.py" in command:
            (out / "runs" / "demo").mkdir(parents=True)
            write_metrics(out / "runs" / "demo" / "metrics.jsonl")
        elif "test.py" in command:
            assert command[command.index("--protocol") + 1] in ("generate", "both")
            shutil.copy(predictions_file, command[command.index("--save_predictions") + 1])
            results = [{"split": "synthetic|val", "protocol": "generate", "counts": {"questions": NUM_VAL},
                        "metrics": {"giou": 0.42, "ciou": 0.4, "count": NUM_VAL}}]
            (out / "eval_report.json").write_text(json.dumps({"results": results}))

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr("sys.argv", ["demo.py", "--out", str(out)])
    demo.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"held-out gIoU 0.420 (generate: the model answers freely) over {NUM_VAL} requests of "
                    f"synthetic|val; pictures: {out / 'summary.png'} (8 held-out requests), {out / 'curve.png'} "
                    "(loss and gIoU by step)")
    assert png(out / "summary.png").shape[1] == SUMMARY_COLUMNS * PANEL_WIDTH_PX
    assert png(out / "curve.png").shape == (CURVE_SIZE_PX[1], CURVE_SIZE_PX[0], 3)
    inference = next(c for c in commands if "inference.py" in c)
    image, question, _ = held_out_request(out / "data")
    assert inference[inference.index("--image") + 1] == str(image)
    assert inference[inference.index("--prompt") + 1] == question


def test_demo_steps_are_timed_by_entry_point(monkeypatch):
    import subprocess
    import sys

    import tools.demo as demo

    monkeypatch.setattr(demo, "STEP_SECONDS", {})
    demo.run([sys.executable, "tools/make_synthetic.py", "--help"], stdout=subprocess.DEVNULL)
    demo.run([sys.executable, "tools/make_synthetic.py", "--help"], stdout=subprocess.DEVNULL)
    assert list(demo.STEP_SECONDS) == ["make_synthetic.py"] and demo.STEP_SECONDS["make_synthetic.py"] > 0
    with pytest.raises(subprocess.CalledProcessError):
        demo.run([sys.executable, "tools/make_synthetic.py", "--no_such_flag"], stderr=subprocess.DEVNULL)
