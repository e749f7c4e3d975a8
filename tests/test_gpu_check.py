"""tools/gpu_check.py --tiny: every stage of the user's path runs, as CI's proof of the wiring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _fake_train_run(runs, logs, peaks_by_batch, step_s_by_batch, out_of_memory=()):
    """A stand-in for running train_ddp.py: writes the metrics.jsonl a run of that batch would;
    ``out_of_memory``: the (batch, checkpointing) runs that fail as CUDA's out-of-memory does."""
    sys.path.insert(0, str(REPO))
    from tools.gpu_check import Stage

    calls = []

    def stage(name, command):
        batch = int(command[command.index("--batch_size") + 1])
        checkpointing = "--gradient_checkpointing" in command
        compiled = "--compile_sam" in command
        # Every run says which way SAM's encoder runs: the baselines eager, whatever the default is.
        assert compiled != ("--no-compile_sam" in command), command
        calls.append((batch, checkpointing) + (("compile_sam",) if compiled else ()))
        if (batch, checkpointing) in out_of_memory:
            (logs / f"{name}.log").write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
            return Stage(name, ok=False, detail="exit code 1; log ...")
        run = runs / command[command.index("--exp_name") + 1]
        run.mkdir(parents=True)
        peak = peaks_by_batch[batch] * (0.8 if checkpointing else 1.0)
        step_s = step_s_by_batch[batch] * (3.0 if checkpointing else 0.9 if compiled else 1.0)
        records = [{"kind": "train", "step": step, "samples": batch, "image_tokens_mean": 391.0,
                    "step_seconds": step_s * (5.0 if step == 1 else 1.0 + 0.01 * step), "peak_gpu_memory_gb": peak}
                   for step in range(1, 7)]
        records.insert(3, {"kind": "val", "step": 3, "giou": 0.1})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return Stage(name, ok=True)

    return stage, calls


def test_train_rows_from_the_training_loops_metrics(tmp_path):
    from tools.gpu_check import measure_train_rows

    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    # Peaks of 20 and 30 GB at batch 2 and 4: batch 8 (about 50 GB) runs, 16 (about 90 GB) is skipped.
    stage, calls = _fake_train_run(runs, logs, {2: 20.0, 4: 30.0, 8: 50.0, 16: 90.0}, {2: 0.2, 4: 0.3, 8: 0.5})
    measured = measure_train_rows(stage, ["train_ddp.py"], runs, logs, warmup=1)
    # ... then batch 2 again with --compile_sam (the default on CUDA) against those eager baselines.
    assert calls == [(2, False), (2, True), (4, False), (8, False), (2, False, "compile_sam")]
    values = measured["values"]
    # The median of steps 2-6 (the slow first step left out; the validation record ignored).
    assert values["gpu_train_step_b2_s"] == pytest.approx(0.2 * 1.04)
    assert values["gpu_train_peak_gb_b2"] == 20.0 and values["gpu_train_peak_gb_b2_ckpt"] == pytest.approx(16.0)
    assert values["gpu_train_samples_per_s_best"] == pytest.approx(8 / (0.5 * 1.04))
    assert measured["details"]["gpu_train_samples_per_s_best"]["best_batch_size"] == 8
    assert measured["details"]["gpu_train_step_b2_s"]["with_compile_sam_step_s"] == pytest.approx(0.9 * 0.2 * 1.04)
    assert measured["runs"]["not_measured"]["b16"].startswith("skipped: about 90 GB")
    assert measured["errors"] == {}


def test_train_rows_stop_at_the_first_batch_out_of_memory(tmp_path):
    from tools.gpu_check import measure_train_rows

    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    stage, calls = _fake_train_run(runs, logs, {2: 30.0}, {2: 0.4}, out_of_memory={(4, False)})
    measured = measure_train_rows(stage, ["train_ddp.py"], runs, logs, warmup=1)
    assert calls == [(2, False), (2, True), (4, False), (2, False, "compile_sam")]
    assert measured["runs"]["not_measured"] == {"b4": "out of memory", "b8": "skipped: batch 4 ran out of memory",
                                                "b16": "skipped: batch 4 ran out of memory"}
    assert measured["values"]["gpu_train_samples_per_s_best"] == pytest.approx(2 / (0.4 * 1.04))
    # A 24 GB card: batch 2 out of memory without checkpointing, and it fits with it.
    runs2, logs2 = tmp_path / "runs2", tmp_path / "logs2"
    logs2.mkdir()
    stage, calls = _fake_train_run(runs2, logs2, {2: 25.0}, {2: 0.4}, out_of_memory={(2, False)})
    measured = measure_train_rows(stage, ["train_ddp.py"], runs2, logs2, warmup=1)
    assert calls == [(2, False), (2, True)]  # no --compile_sam run without a batch-2 run to compare with
    assert measured["values"] == {"gpu_train_peak_gb_b2_ckpt": pytest.approx(20.0)}
    assert measured["errors"]["gpu_train_step_b2_s"] == "run b2: out of memory"


def test_gpu_check_tiny_train_rows_run_train_ddp(tmp_path):
    """--train_rows on tiny models: train_ddp.py per batch size, timing read from its metrics.jsonl."""
    summary_file = tmp_path / "summary.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--tiny", "--train_rows", "--train_rows_steps", "3",
         "--train_rows_warmup", "1", "--workers", "0", "--num_train", "4", "--work", str(tmp_path / "work"),
         "--train_rows_max_batch", "4", "--out", str(summary_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert [stage["name"] for stage in summary["stages"]] == [
        "write_inputs", "train_rows_b2", "train_rows_b2_ckpt", "train_rows_b4", "train_rows_b2_compile_sam"]
    assert summary["ok"] and "gpu_rows" not in summary  # tiny models on a CPU are not GPU rows
    check = summary["train_rows_code_path_check"]
    assert set(check["runs"]["measured"]) == {"b2", "b2_ckpt", "b4", "b2_compile_sam"}
    assert check["runs"]["not_measured"] == {name: "skipped: above --train_rows_max_batch 4" for name in ("b8", "b16")}
    assert all(figures["samples_per_step"] == int(name[1:].split("_")[0])
               for name, figures in check["runs"]["measured"].items())
    assert set(check["values"]) == {"gpu_train_step_b2_s", "gpu_train_samples_per_s_best"}  # no peak without CUDA
    assert "b2: " in result.stdout
