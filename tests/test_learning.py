"""The built-in default learns: a short run of the demo recipe raises held-out gIoU by at least 0.3."""

import json
import subprocess
import sys

from conftest import REPO
from test_train import env


def val_giou(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["giou"] for e in entries if e["kind"] == "val"]


def test_short_demo_recipe_raises_held_out_giou(tmp_path):
    data, model = tmp_path / "data", tmp_path / "tiny"
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(data), "--seed", "0", "--num_train", "500",
                    "--num_val", "40", "--overwrite", "--no_progress"], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/make_tiny_model.py", "--out", str(model)], cwd=REPO, check=True,
                   capture_output=True)
    common = [sys.executable, "train_ddp.py", "--config", "configs/demo_tiny.json", "--version", str(model),
              "--dataset_dir", str(data), "--log_base_dir", str(tmp_path / "runs"), "--max_val_samples", "40",
              "--workers", "1"]
    before = subprocess.run(common + ["--exp_name", "before", "--eval_only"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert before.returncode == 0, before.stderr[-3000:]
    after = subprocess.run(common + ["--exp_name", "after", "--steps_per_epoch", "600", "--eval_steps", "600"],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert after.returncode == 0, after.stderr[-3000:]
    [start] = val_giou(tmp_path / "runs" / "before")
    [end] = val_giou(tmp_path / "runs" / "after")
    assert end - start >= 0.3, f"held-out gIoU went from {start:.3f} to {end:.3f}"
