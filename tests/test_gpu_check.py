"""tools/gpu_check.py --tiny: every stage of the user's path runs, as CI's proof of the wiring."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_every_stage(tmp_path):
    summary_file = tmp_path / "summary.json"
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--tiny", "--work", str(work), "--out", str(summary_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert summary_file.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    stages = {stage["name"]: stage for stage in summary["stages"]}
    failed = {name: stage["detail"] for name, stage in stages.items() if not stage["ok"]}
    assert result.returncode == 0 and summary["ok"], (failed, summary.get("failed_logs"))
    assert list(stages) == ["write_inputs", "load_train", "train_until_sigterm", "train_resume", "merge",
                            "load_infer", "inference", "test"]
    # Preempted mid-run, then resumed to the last step.
    assert 2 < stages["train_until_sigterm"]["extra"]["stopped_at_step"] < 8
    assert stages["train_resume"]["extra"]["last_step"] == 8
    # Loading for training: trainable weights fp32, frozen ones in the run dtype (fp32 on a CPU).
    train_dtypes = stages["load_train"]["extra"]["bytes_by_dtype"]
    assert set(train_dtypes) <= {"float32", "float32/trainable"} and train_dtypes["float32/trainable"] > 0
    # Loading for inference in bf16: nothing left in fp32 but SAM's small prompt encoder.
    infer_dtypes = stages["load_infer"]["extra"]["bytes_by_dtype"]
    bf16 = sum(v for k, v in infer_dtypes.items() if k.startswith("bfloat16"))
    assert infer_dtypes.get("float32", 0) < 0.02 * bf16
    # The user sees how many image tokens the request cost, within the --max_pixels given.
    assert "image tokens" in stages["inference"]["extra"]["output"]
    protocols = {entry["protocol"] for entry in stages["test"]["extra"]["results"]}
    assert protocols == {"teacher_forced", "generate"}
    assert stages["train_until_sigterm"]["host_peak_gb"] > 0
    assert not work.exists(), "the working directory is removed unless --keep"
