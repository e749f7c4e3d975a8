"""test.py's COCO AP on a COCO-format split with an unreadable image: left out, not scored as a miss."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from test_eval import forced, run
from utils.distributed import free_port

SPLIT = "coco|instances.json|images"


@pytest.fixture(scope="module")
def coco_with_corrupt_image(tmp_path_factory):
    """Three images with a cat each, one category: one item per image, so that under two
    processes the second image (item 1) is on rank 1 only. Its file is not an image."""
    root = tmp_path_factory.mktemp("coco_corrupt")
    (root / "images").mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "images" / name)
    (root / "images" / "b.png").write_bytes(b"not a png")
    content = {
        "images": [{"id": k, "file_name": name, "height": 40, "width": 50}
                   for k, name in enumerate(("a.png", "b.png", "c.png"), 1)],
        "annotations": [{"id": 10 + k, "image_id": k, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]]} for k in (1, 2, 3)],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (root / "instances.json").write_text(json.dumps(content))
    return root


def coco_argv(model_dir, data_dir, out_dir):
    return ["--version", str(model_dir), "--dataset_dir", str(data_dir), "--val_dataset", SPLIT,
            "--protocol", "generate", "--max_new_tokens", "4", "--workers", "0", "--no_progress",
            "--report", str(out_dir / "report.json"), "--save_detections", str(out_dir / "detections.json")]


def coco_entry(out_dir):
    [entry] = json.loads((out_dir / "report.json").read_text())["results"]
    return entry


def test_an_unreadable_image_is_left_out_of_coco_ap(tiny_segmenter_dir, coco_with_corrupt_image, tmp_path, monkeypatch):
    import utils.metrics
    from model.segmenter import ReasonSegmenter
    from utils.eval_cli import main

    generate = ReasonSegmenter.generate
    monkeypatch.setattr(ReasonSegmenter, "generate", lambda self, batch, **kwargs: generate(
        self, batch, **{**kwargs, **forced(self, "[SEG].")}))
    scored_images = []
    average_precision = utils.metrics.coco_average_precision

    def recording(ground_truth, detections, iou_type="bbox", image_ids=None):
        scored_images.append(sorted(image_ids))
        return average_precision(ground_truth, detections, iou_type, image_ids)

    monkeypatch.setattr(utils.metrics, "coco_average_precision", recording)
    said = []
    assert main(coco_argv(tiny_segmenter_dir(), coco_with_corrupt_image, tmp_path), say=said.append) == 0
    entry = coco_entry(tmp_path)
    assert entry["counts"]["unreadable"] == 1 and entry["counts"]["evaluated_items"] == 3
    # Image 2 has no answer because its file is unreadable, not because the model missed its cat.
    assert scored_images == [[1, 3], [1, 3]]
    coco = entry["coco_ap"]
    assert (coco["images"], coco["unreadable_images"]) == (2, 1)
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert coco["detections"] == len(detections) > 0 and {d["image_id"] for d in detections} == {1, 3}
    assert f"COCO AP over 2 images, 1 images with an unreadable item left out, {len(detections)} detections" in said[0]


def test_two_processes_leave_out_an_image_unreadable_on_another_rank(
    tiny_segmenter_dir, coco_with_corrupt_image, tmp_path
):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "test.py", *coco_argv(tiny_segmenter_dir(), coco_with_corrupt_image, tmp_path)]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    entry = coco_entry(tmp_path)
    assert entry["counts"]["unreadable"] == 1  # read on rank 1, which holds item 1 (ShardedEvalSampler)
    assert (entry["coco_ap"]["images"], entry["coco_ap"]["unreadable_images"]) == (2, 1)
