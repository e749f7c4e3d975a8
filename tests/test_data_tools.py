"""The command-line tools, run as users run them."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tools") / "synthetic"
    result = run_tool("tools/make_synthetic.py", "--out", str(root), "--seed", "1", "--num_train", "8",
                      "--num_val", "4", "--no_progress")
    assert "--dataset_dir" in result.stdout and (root / "synthetic.json").is_file()
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "dataset,split,mode",
    [("reason_seg", "ReasonSeg|val", "val"), ("refer_seg", "grefcoco|unc|val", "val"), ("sem_seg", "ade20k", "train")],
)
def test_inspect_data_writes_images_masks_and_jsonl(synthetic_root: Path, tmp_path: Path, dataset: str, split: str,
                                                    mode: str) -> None:
    out = tmp_path / "inspect"
    run_tool("tools/inspect_data.py", "--dataset_dir", str(synthetic_root), "--dataset", dataset, "--split", split,
             "--mode", mode, "--num", "4", "--out", str(out))
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 4
    for record in records:
        assert Path(record["image"]).is_file() and str(synthetic_root) in record["image"]
        assert record["requests"] and isinstance(record["answer"], str)
        assert len(record["masks"]) == record["answer"].count("[SEG]")
        image = np.asarray(Image.open(record["image"]))
        for mask_path, values in zip(record["masks"], record["mask_values"]):
            mask = np.asarray(Image.open(mask_path))
            assert mask.ndim == 2 and mask.dtype == np.uint8 and mask.shape == image.shape[:2]
            assert sorted(np.unique(mask).tolist()) == values and set(values) <= {0, 1, 255}
        for overlay in record["overlays"]:
            assert Image.open(overlay).size == (image.shape[1], image.shape[0])


def test_inspect_data_shows_named_answers(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "named"
    run_tool("tools/inspect_data.py", "--dataset_dir", str(synthetic_root), "--dataset", "synthetic|val",
             "--answer_style", "named", "--num", "4", "--out", str(out))
    for record in read_jsonl(out / "samples.jsonl"):
        content = json.loads(Path(record["image"]).with_suffix(".json").read_text())
        assert record["answer"] == f"Sure, it is {content['target_names'][0].lower()} [SEG]."


def test_inspect_data_keeps_ignore_values(tmp_path: Path) -> None:
    expected = fx.write_reason_seg(tmp_path / "root")["train_mask"]
    out = tmp_path / "out"
    run_tool("tools/inspect_data.py", "--dataset_dir", str(tmp_path / "root"), "--dataset", "reason_seg",
             "--split", "ReasonSeg|train", "--num", "1", "--out", str(out))
    record = read_jsonl(out / "samples.jsonl")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(record["masks"][0])), expected)
    overlay = np.asarray(Image.open(record["overlays"][0])).astype(int)
    assert overlay[7, 12, 0] > overlay[7, 12, 1]  # ignore pixel tinted red
    assert overlay[15, 20, 1] > overlay[15, 20, 0]  # target pixel tinted green
