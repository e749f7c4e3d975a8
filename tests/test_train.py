"""train_ddp.py as users run it: real processes, torchrun with 2 ranks, real checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from utils.distributed import free_port
from utils import checkpoint as ckpt

SYNTHETIC_FLAGS = [
    "--dataset", "sem_seg||refer_seg||vqa||reason_seg",
    "--sample_rates", "3,3,1,3",
    "--sem_seg_data", "ade20k",
    "--refer_seg_data", "refcoco||grefcoco",
    "--vqa_data", "synthetic_vqa",
    "--reason_seg_data", "ReasonSeg|train",
    "--val_dataset", "synthetic|val",
]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--seed", "1", "--num_train", "40",
         "--num_val", "12", "--overwrite", "--no_progress"],
        cwd=REPO, check=True, capture_output=True,
    )
    return out


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_command(model_dir, data_dir, run_base, exp, *extra, nproc=0):
    launcher = [sys.executable, "train_ddp.py"]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "train_ddp.py"]
    return [
        *launcher, "--version", str(model_dir), "--dataset_dir", str(data_dir), *SYNTHETIC_FLAGS,
        "--log_base_dir", str(run_base), "--exp_name", exp, "--batch_size", "2", "--workers", "0",
        "--warmup_steps", "2", "--lr", "1e-3", "--max_val_samples", "6", *extra,
    ]


def run(command, **kwargs):
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, **kwargs)
    return result


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last logged record of each step (a resumed run logs the steps after its checkpoint)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "train":
            records[entry["step"]] = entry
    return records


def trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights = {f"head.{k}": v for k, v in load_file(checkpoint / "head.safetensors").items()}
    weights.update({f"adapter.{k}": v for k, v in load_file(checkpoint / "adapter" / "adapter_model.safetensors").items()})
    return weights


def test_single_process_run_writes_checkpoints_logs_and_validates(tiny_segmenter_dir, synthetic_root, tmp_path):
    result = run(train_command(
        tiny_segmenter_dir(), synthetic_root, tmp_path, "single", "--epochs", "2", "--steps_per_epoch", "3",
        "--grad_accumulation_steps", "2", "--eval_steps", "3", "--save_steps", "2", "--save_total_limit", "1",
    ), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 4 = batch_size 2 x accumulation 2 x 1 processes" in result.stderr
    assert (result.stdout + result.stderr).count("effective batch") == 1
    assert "validation synthetic|val (teacher_forced): gIoU" in result.stdout
    run_dir = tmp_path / "single"
    names = sorted(p.name for p in ckpt.list_checkpoints(run_dir))
    best = ckpt.best_checkpoint(run_dir)
    # The last one kept (limit 1) plus the best by validation gIoU.
    assert names[-1] == "checkpoint-0000006" and best is not None and best.name in names and len(names) <= 2
    assert (run_dir / "latest").read_text().strip() == "checkpoint-0000006"
    state = ckpt.read_state(run_dir / "checkpoint-0000006")
    assert state["global_step"] == 6 and state["epoch"] == 2
    assert not list(run_dir.glob(".*.tmp"))
    # Trainable weights only, in peft's adapter format; SAM is referenced, not copied.
    last = run_dir / "checkpoint-0000006"
    assert (last / "adapter" / "adapter_config.json").is_file() and not (last / "sam.safetensors").exists()
    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert all(r["samples"] == 4 for r in records.values())
    assert records[1]["lr"] < records[2]["lr"]  # warmup
    vals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert [v["step"] for v in vals] == [3, 6] and all(v["protocol"] == "teacher_forced" for v in vals)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_and_resumed_run_matches_uninterrupted_run_under_torchrun(tiny_segmenter_dir, synthetic_root, tmp_path):
    """Two processes (gloo): SIGTERM mid-run saves a checkpoint; --auto_resume ends identically."""
    common = ["--epochs", "2", "--steps_per_epoch", "4", "--grad_accumulation_steps", "2", "--no_eval",
              "--save_steps", "100", "--lora_dropout", "0.3"]
    straight = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "straight", *common, nproc=2), timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted_cmd = train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "resumed", *common, "--auto_resume",
                                    "--log_steps", "1", nproc=2)
    process = subprocess.Popen(interrupted_cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # a cluster preempting the job signals every process
    _, stderr = process.communicate(timeout=300)
    saved = ckpt.latest_checkpoint(tmp_path / "resumed")
    assert saved is not None, stderr[-3000:]
    stopped_at = ckpt.read_state(saved)["global_step"]
    assert 1 <= stopped_at < 8, "the run should have been stopped before the end"
    assert "SIGTERM received" in stderr

    resumed = run(interrupted_cmd, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    final_a = trainable_weights(tmp_path / "straight" / "checkpoint-0000008")
    final_b = trainable_weights(tmp_path / "resumed" / "checkpoint-0000008")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=1e-6, msg=key)
    losses_a, losses_b = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, 9))
    for step in losses_a:
        assert losses_a[step]["loss"] == pytest.approx(losses_b[step]["loss"], abs=1e-6), step
        assert losses_a[step]["samples"] == 8  # 2 ranks x batch 2 x accumulation 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--dataset", "sem_seg||imagenet", "--sample_rates", "1,1"], "imagenet"),
        (["--sample_rates", "1,1"], "--sample_rates"),
        (["--vision_pretrained", "missing_sam.pth"], "--vision_pretrained missing_sam.pth: file not found"),
        (["--val_dataset", "ReasonSeg|nosuchsplit"], "nosuchsplit"),
        pytest.param(["--precision", "fp16"], "--precision fp16 trains only on a CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on CUDA")),
    ],
)
def test_bad_configuration_stops_before_training(tiny_segmenter_dir, synthetic_root, tmp_path, extra, message):
    result = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "bad", "--steps_per_epoch", "1", *extra), timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_missing_version_and_sam_are_named(tmp_path, tiny_vlm_dir):
    result = run([sys.executable, "train_ddp.py", "--dataset_dir", str(tmp_path)], timeout=60)
    assert result.returncode != 0 and "--version is required" in result.stderr
    result = run([sys.executable, "train_ddp.py", "--version", str(tiny_vlm_dir()), "--dataset_dir", str(tmp_path)], timeout=60)
    assert result.returncode != 0 and "--vision_pretrained is required" in result.stderr
    result = run([sys.executable, "train_ddp.py", "--version", str(tmp_path / "nope"), "--dataset_dir", str(tmp_path)], timeout=60)
    assert result.returncode != 0 and "directory not found" in result.stderr


def test_auto_resume_of_a_new_run_needs_vision_pretrained_before_loading(tmp_path, tiny_vlm_dir, capsys):
    """--auto_resume with nothing to resume yet builds the model from --version and SAM: the same
    error as without it; once a checkpoint is there (it names its SAM file), SAM is not needed."""
    from utils.train_args import parse_args

    flags = ["--version", str(tiny_vlm_dir()), "--dataset_dir", str(tmp_path), "--log_base_dir", str(tmp_path),
             "--exp_name", "run", "--auto_resume"]
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert "--vision_pretrained is required" in capsys.readouterr().err
    ckpt.begin_checkpoint(tmp_path / "run", 1)
    ckpt.finish_checkpoint(tmp_path / "run", 1, {"global_step": 1})
    assert parse_args(flags).vision_pretrained is None


def test_save_steps_0_saves_at_the_end_only_and_below_0_is_refused(tiny_segmenter_dir, tmp_path, capsys):
    from utils.data.builders import build_train_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    flags = ["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
             "--dataset_dir", str(small_synthetic_root(tmp_path / "data")), "--log_base_dir", str(tmp_path),
             "--no_eval", "--workers", "0", "--batch_size", "1", "--steps_per_epoch", "3", "--save_total_limit", "0"]
    args = parse_args([*flags, "--save_steps", "0"])
    trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), build_train_dataset(args, 3, seed=args.seed), None)
    trainer.train()
    trainer.close()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / args.exp_name)] == ["checkpoint-0000003"]
    with pytest.raises(SystemExit):
        parse_args([*flags, "--save_steps", "-1"])
    assert "--save_steps must be at least 0 (0: only at the end), got -1" in capsys.readouterr().err


def test_resume_from_an_incompatible_configuration_is_refused(tiny_segmenter_dir, synthetic_root, tmp_path):
    first = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "a", "--steps_per_epoch", "1", "--epochs", "1",
                              "--no_eval", "--grad_accumulation_steps", "1"), timeout=200)
    assert first.returncode == 0, first.stderr[-2000:]
    result = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "b", "--resume", str(tmp_path / "a" / "checkpoint-0000001"),
                               "--lora_r", "16", "--no_eval"), timeout=200)
    assert result.returncode != 0
    assert "--lora_r is 16 here but 8 in the checkpoint" in result.stderr


def test_effective_batch_is_kept_when_the_process_count_changes():
    from utils.train_args import accumulation_for, parse_args

    args = parse_args(["--version", str(REPO), "--vision_pretrained", __file__, "--dataset_dir", str(REPO),
                       "--batch_size", "2", "--effective_batch_size", "160"])
    assert accumulation_for(args, 8) == 10 and accumulation_for(args, 2) == 40
    with pytest.raises(SystemExit, match="not a multiple"):
        accumulation_for(args, 3)


def test_booleans_switch_both_ways_and_config_file_is_read(tmp_path):
    from utils.train_args import parse_args

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"gradient_checkpointing": True, "lr": 0.01}))
    base = ["--version", str(REPO), "--vision_pretrained", __file__, "--dataset_dir", str(REPO), "--config", str(config)]
    args = parse_args(base)
    assert args.gradient_checkpointing is True and args.lr == 0.01
    args = parse_args(base + ["--no-gradient_checkpointing", "--lr", "0.5"])
    assert args.gradient_checkpointing is False and args.lr == 0.5
    (tmp_path / "bad.json").write_text(json.dumps({"no_such_flag": 1}))
    with pytest.raises(SystemExit):
        parse_args(base[:-1] + [str(tmp_path / "bad.json")])


def test_gradient_checkpointing_is_applied_and_validation_restores_training_mode(tiny_segmenter_dir, synthetic_root, tmp_path):
    from utils.data.builders import build_val_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    args = parse_args(["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path),
                       "--gradient_checkpointing", "--val_dataset", "synthetic|val", "--max_val_samples", "3", "--workers", "0"])
    trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), None, build_val_dataset("synthetic|val", str(synthetic_root)))
    assert trainer.model.vlm.is_gradient_checkpointing
    layers = [m for n, m in trainer.model.vlm.named_modules() if n.endswith("language_model.layers.0")]
    assert layers and layers[0].gradient_checkpointing
    trainer.model.train()
    scores = trainer.validate()
    assert scores["count"] == 3 and 0 <= scores["giou"] <= 1
    assert trainer.model.training and trainer.model.sam.mask_decoder.training
    assert not trainer.model.sam.image_encoder.training
    trainer.close()


def test_a_signal_during_validation_saves_at_once_and_stops(tiny_segmenter_dir, synthetic_root, tmp_path, caplog):
    """torchrun kills its workers 30 s after forwarding SIGTERM: a validation under way stops at the
    next batch, is neither scored nor logged, and the checkpoint of the step is written before exit."""
    from utils.data.builders import build_train_dataset, build_val_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    args = parse_args(["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
                       "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path), "--exp_name", "sig",
                       "--val_dataset", "synthetic|val", "--max_val_samples", "0", "--max_steps", "4",
                       "--steps_per_epoch", "4", "--eval_steps", "2", "--save_steps", "10", "--batch_size", "1",
                       "--grad_accumulation_steps", "1", "--workers", "0"])

    class SignalDuringValidation(torch.utils.data.Dataset):
        """The validation split; a SIGTERM comes in as its first item is read."""

        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            trainer.stop.requested = True
            return self.data[index]

    val_data = SignalDuringValidation(build_val_dataset("synthetic|val", str(synthetic_root)))
    trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")),
                      build_train_dataset(args, samples_per_epoch=4, seed=0), val_data)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with caplog.at_level("WARNING"):
            scores = trainer.train()  # installs the trainer's own SIGTERM / SIGINT handlers
    finally:
        trainer.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert scores == {} and trainer.global_step == 2
    assert ckpt.latest_checkpoint(tmp_path / "sig").name == "checkpoint-0000002"
    records = [json.loads(line) for line in (tmp_path / "sig" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train"]  # no validation record
    assert "validation at step 2 stopped by a signal" in caplog.text


def test_deepspeed_zero2_trains_like_ddp_and_writes_the_same_checkpoints(tiny_segmenter_dir, synthetic_root, tmp_path):
    from model.segmenter import ReasonSegmenter

    common = ["--epochs", "1", "--steps_per_epoch", "3", "--grad_accumulation_steps", "2", "--no_eval", "--lora_dropout", "0"]
    ddp = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "ddp", *common, nproc=2), timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    deepspeed = run(train_command(tiny_segmenter_dir(), synthetic_root, tmp_path, "ds", *common,
                                  "--deepspeed", str(REPO / "configs" / "ds_zero2.json"), nproc=2), timeout=600)
    assert deepspeed.returncode == 0, deepspeed.stderr[-3000:]
    assert "; DeepSpeed" in deepspeed.stderr  # the backend the run's first line names
    losses_ddp, losses_ds = train_records(tmp_path / "ddp"), train_records(tmp_path / "ds")
    for step in (1, 2, 3):
        assert losses_ds[step]["loss"] == pytest.approx(losses_ddp[step]["loss"], abs=1e-4)
        assert losses_ds[step]["lr"] == pytest.approx(losses_ddp[step]["lr"])
    weights_ddp = trainable_weights(tmp_path / "ddp" / "checkpoint-0000003")
    weights_ds = trainable_weights(tmp_path / "ds" / "checkpoint-0000003")
    assert weights_ddp.keys() == weights_ds.keys()
    for key in weights_ddp:
        torch.testing.assert_close(weights_ds[key], weights_ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    model = ReasonSegmenter.from_pretrained(tmp_path / "ds" / "checkpoint-0000003")
    assert model.config.adapter_path == "adapter"


def test_non_finite_losses_skip_steps_and_too_many_stop_the_run(tiny_segmenter_dir, synthetic_root, tmp_path):
    from utils.data.builders import build_train_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    args = parse_args(["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
                       "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path), "--no_eval", "--workers", "0",
                       "--batch_size", "1", "--steps_per_epoch", "6", "--max_nonfinite_steps", "2", "--save_steps", "100"])
    data = build_train_dataset(args, samples_per_epoch=6, seed=args.seed)
    trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), data, None)
    real_forward = trainer.model.forward
    poisoned_steps = {2, 4, 5, 6}
    calls = {"n": 0}

    def forward(batch):
        calls["n"] += 1
        output = real_forward(batch)
        if calls["n"] in poisoned_steps:
            output.loss = output.loss * float("nan")
        return output

    trainer.model.forward = forward
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(SystemExit, match="3 non-finite losses in a row"):
        trainer.train()
    records = train_records(tmp_path / args.exp_name)
    assert [r["nonfinite_steps"] for r in records.values()] == [0, 1, 1, 2, 3]
    # Steps 2 and 4 were skipped: the weights after step 4 are those of steps 1 and 3 only.
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer.close()


def test_fp16_loss_scaling_in_the_training_step_and_on_resume(tiny_segmenter_dir, synthetic_root, tmp_path, monkeypatch):
    """The Trainer's own step with loss scaling: small gradients survive fp16, an overflow skips
    the step (not a non-finite loss), a NaN loss is still one, and the scale resumes exactly.

    No GPU here: a CPU GradScaler stands in for CUDA's and CPU autocast gives the fp16 compute.
    """
    import utils.trainer as trainer_module
    from utils.backends import LOSS_SCALER_FILE
    from utils.data.builders import build_train_dataset
    from utils.distributed import DistInfo
    from utils.mixed_precision import DynamicLossScaling, NoLossScaling
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    monkeypatch.setattr(trainer_module, "loss_scaling_for", lambda device, precision: DynamicLossScaling("cpu"))
    flags = ["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
             "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path), "--no_eval", "--workers", "0",
             "--batch_size", "2", "--steps_per_epoch", "8", "--lora_dropout", "0", "--save_steps", "100"]
    args = parse_args(flags)
    data = build_train_dataset(args, samples_per_epoch=16, seed=args.seed)
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer = Trainer(args, cpu, data, None)
    scaling = trainer.backend.loss_scaling
    assert isinstance(scaling, DynamicLossScaling) and scaling.scale == 2.0**16
    batch = trainer.model.collate([data[0], data[1]], padding_side="right")
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    applied = []
    trainer.backend.optimizer.register_step_pre_hook(
        lambda *_: applied.append(torch.cat([p.grad.flatten() for p in params.values() if p.grad is not None]))
    )
    real_forward = trainer.model.forward

    def step(loss_scaling, fp16: bool, factor: float) -> dict:
        """One optimizer step on the same batch with the loss times ``factor``; weights restored."""
        trainer.backend.loss_scaling = loss_scaling

        def forward(batch):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                output = real_forward(batch)
            output.loss = output.loss * factor
            return output

        trainer.model.forward = forward
        applied.clear()
        record = trainer._optimizer_step([batch])
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(start[name])
        return record

    step(NoLossScaling(), fp16=False, factor=1e-6)  # true gradients of about 1e-8 per element
    reference = applied[0]
    assert 0 < reference.abs().max() < 1e-6
    record = step(NoLossScaling(), fp16=True, factor=1e-6)
    # Flushed to zero in fp16: all but a few (<1%) of the gradient elements.
    assert len(applied) == 1 and torch.count_nonzero(applied[0]) < 0.01 * torch.count_nonzero(reference)
    record = step(scaling, fp16=True, factor=1e-6)
    assert len(applied) == 1 and torch.count_nonzero(applied[0]) > 0.8 * torch.count_nonzero(reference)
    assert torch.nn.functional.cosine_similarity(applied[0], reference, dim=0) > 0.999
    assert (applied[0] - reference).norm() < 0.05 * reference.norm()
    assert record["loss_scale"] == 2.0**16 and record["overflow_steps"] == 0 and record["nonfinite_steps"] == 0

    record = step(scaling, fp16=True, factor=1e12)  # finite loss, gradients overflow once scaled
    assert not applied and record["grad_norm"] == 0.0
    assert record["overflow_steps"] == 1 and record["nonfinite_steps"] == 0 and record["loss_scale"] == 2.0**15
    record = step(scaling, fp16=True, factor=float("nan"))  # a non-finite loss is still counted as one
    assert not applied and record["nonfinite_steps"] == 1 and record["overflow_steps"] == 1
    assert record["loss_scale"] == 2.0**15
    step(scaling, fp16=True, factor=1.0)
    # One clean step since the overflow reset the growth tracker (the NaN step left the scaler alone).
    assert len(applied) == 1 and scaling.state_dict()["_growth_tracker"] == 1

    trainer.global_step = 5
    trainer.skipped_by_source["vqa"] = 2
    checkpoint = trainer.save_checkpoint()
    trainer.close()
    assert (checkpoint / LOSS_SCALER_FILE).is_file()
    assert ckpt.read_state(checkpoint)["overflow_total"] == 1
    resumed = Trainer(parse_args(flags + ["--resume", str(checkpoint)]), cpu, build_train_dataset(args, samples_per_epoch=16, seed=args.seed), None)
    assert resumed.backend.loss_scaling.state_dict() == scaling.state_dict()
    assert resumed.overflow_total == 1 and resumed.nonfinite_total == 1 and resumed.global_step == 5
    assert resumed.skipped_by_source == {"sem_seg": 0, "refer_seg": 0, "vqa": 2, "reason_seg": 0}
    resumed.close()


def small_synthetic_root(path: Path) -> Path:
    from utils.data import write_synthetic_dataset

    write_synthetic_dataset(str(path), seed=1, num_train=10, num_val=4)
    return path


def test_a_source_that_cannot_be_read_stops_the_run_before_training(tiny_segmenter_dir, tmp_path):
    root = small_synthetic_root(tmp_path / "data")
    (root / "coco" / "train2017").rename(root / "coco" / "images")  # every VQA image where nobody looks
    result = run(train_command(tiny_segmenter_dir(), root, tmp_path, "bad_source", "--steps_per_epoch", "2"), timeout=200)
    assert result.returncode != 0
    assert "data configuration error: training source 'vqa' cannot be read" in result.stderr
    assert str(root / "coco" / "train2017") in result.stderr and "first error: CorruptSampleError" in result.stderr
    assert not (tmp_path / "bad_source" / "metrics.jsonl").exists()


def test_corrupt_files_are_skipped_and_counted_per_source(tiny_segmenter_dir, tmp_path):
    root = small_synthetic_root(tmp_path / "data")
    images = sorted((root / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg"))
    for image in images[1::2]:  # half of ReasonSeg's training images
        image.write_bytes(b"\xff\xd8 not a jpeg")
    result = run(train_command(tiny_segmenter_dir(), root, tmp_path, "corrupt", "--sample_rates", "1,1,1,4",
                               "--epochs", "1", "--steps_per_epoch", "3", "--grad_accumulation_steps", "1",
                               "--no_eval", "--save_steps", "100"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping" in result.stderr
    records = train_records(tmp_path / "corrupt")
    last = records[3]
    assert last["skipped_samples"] > 0
    assert last["skipped_by_source"] == {"sem_seg": 0, "refer_seg": 0, "vqa": 0, "reason_seg": last["skipped_samples"]}
    counts = [r["skipped_by_source"]["reason_seg"] for r in records.values()]
    assert counts == sorted(counts)  # cumulative
    state = ckpt.read_state(tmp_path / "corrupt" / "checkpoint-0000003")
    assert state["skipped_by_source"] == last["skipped_by_source"] and state["samples_skipped"] == last["skipped_samples"]


def test_validation_scores_what_test_py_prints(tiny_segmenter_dir, synthetic_root, tmp_path):
    """The best checkpoint is chosen on test.py's numbers: training validation and test.py score
    the same ReasonSeg items (the first query of each image by default, every query with
    --reason_seg_queries all) with the same code and the same answers (--answer_style named: the
    checkpoint records it, test.py reads it), and give identical gIoU and cIoU."""
    result = run(train_command(
        tiny_segmenter_dir(), synthetic_root, tmp_path, "val", "--max_steps", "2", "--eval_steps", "2",
        "--max_val_samples", "0", "--answer_style", "named",
    ), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "val"
    [val] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    checkpoint = ckpt.best_checkpoint(run_dir)
    assert checkpoint is not None and ckpt.read_state(checkpoint)["best_giou"] == val["giou"]
    assert json.loads((checkpoint / "config.json").read_text())["answer_style"] == "named"

    def test_py(*extra):
        out = tmp_path / f"test{len(extra)}"
        done = run([sys.executable, "test.py", "--version", str(run_dir), "--pick", "best", "--dataset_dir",
                    str(synthetic_root), "--val_dataset", "synthetic|val", "--workers", "0", "--no_progress",
                    "--log_dir", str(out), *extra], timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["model"]["answer_style"] == "named"
        [entry] = report["results"]
        return entry

    first = test_py()
    assert first["counts"]["questions"] == val["questions"] == val["items"] == 12  # one query per image
    assert (first["metrics"]["giou"], first["metrics"]["ciou"]) == (val["giou"], val["ciou"])
    # Every query: the same flag on both sides.
    result = run(train_command(
        tiny_segmenter_dir(), synthetic_root, tmp_path, "val_all", "--resume", str(checkpoint), "--eval_only",
        "--max_val_samples", "0", "--reason_seg_queries", "all", "--answer_style", "named",
    ), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [val_all] = [json.loads(l) for l in (tmp_path / "val_all" / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    every = test_py("--reason_seg_queries", "all")
    assert every["counts"]["questions"] == val_all["questions"] > 12
    assert (every["metrics"]["giou"], every["metrics"]["ciou"]) == (val_all["giou"], val_all["ciou"])


def test_sam_feature_cache_trains_exactly_as_without_and_reuses_embeddings(tiny_segmenter_dir, synthetic_root, tmp_path):
    """SAM's encoder is frozen, so its cached output changes nothing: the same losses and weights
    over steps that see the same pictures again, and a picture seen again is not encoded again."""
    from model.image_cache import find_vision_tower
    from utils.data.builders import build_train_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    def train(*extra):
        args = parse_args(["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
                           "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path), "--exp_name", f"run{extra[-1]}",
                           "--no_eval", "--workers", "0", "--batch_size", "4", "--lora_dropout", "0", *extra])
        data = build_train_dataset(args, samples_per_epoch=8, seed=args.seed)
        trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), data, None)
        batches = [trainer.model.collate([data[i] for i in range(start, start + 4)]) for start in (0, 4)]
        encoded = []
        trainer.model.sam.image_encoder.register_forward_hook(lambda _m, inputs, _o: encoded.append(len(inputs[0])))
        # A training cache leaves the vision tower alone (its outputs are large at real size).
        assert "forward" not in find_vision_tower(trainer.model.vlm).__dict__
        records = [trainer._optimizer_step([batch]) for batch in (*batches, *batches)]  # each picture twice
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.close()
        return records, weights, sum(encoded)

    plain_records, plain_weights, plain_encoded = train("--sam_feature_cache", "0")  # the demo's recipe turns it on
    cached_records, cached_weights, cached_encoded = train("--sam_feature_cache", "64")
    assert [r["loss"] for r in cached_records] == [r["loss"] for r in plain_records]
    assert all(torch.equal(cached_weights[n], plain_weights[n]) for n in plain_weights)
    # The second pass over the same batches finds every picture: half the encodes, or fewer when
    # one scene is drawn from two sources (the synthetic sources share their scenes).
    assert 0 < cached_encoded <= plain_encoded // 2
    assert "sam_cache_hit_rate" not in plain_records[-1]
    assert cached_records[-1]["sam_cache_hit_rate"] == pytest.approx(1 - cached_encoded / plain_encoded)


def test_compiled_sam_encoder_trains_as_the_eager_one(tiny_segmenter_dir, synthetic_root, tmp_path):
    """--compile_sam: the frozen encoder compiled block by block gives the same losses and weights."""
    from model.sam_compile import image_encoder_is_compiled
    from utils.data.builders import build_train_dataset
    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    def train(flag):
        args = parse_args(["--config", str(REPO / "configs" / "demo_tiny.json"), "--version", str(tiny_segmenter_dir()),
                           "--dataset_dir", str(synthetic_root), "--log_base_dir", str(tmp_path), "--exp_name", flag.strip("-"),
                           "--no_eval", "--workers", "0", "--batch_size", "4", "--lora_dropout", "0",
                           "--sam_feature_cache", "0", flag])
        data = build_train_dataset(args, samples_per_epoch=8, seed=args.seed)
        trainer = Trainer(args, DistInfo(0, 1, 0, torch.device("cpu")), data, None)
        assert image_encoder_is_compiled(trainer.model.sam.image_encoder) == (flag == "--compile_sam")
        batches = [trainer.model.collate([data[i] for i in range(start, start + 4)]) for start in (0, 4)]
        records = [trainer._optimizer_step([batch]) for batch in batches]
        # Still compiled after the steps: they ran compiled, not through the eager fallback.
        assert image_encoder_is_compiled(trainer.model.sam.image_encoder) == (flag == "--compile_sam")
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.close()
        return records, weights

    eager_records, eager_weights = train("--no-compile_sam")
    compiled_records, compiled_weights = train("--compile_sam")
    for eager, compiled in zip(eager_records, compiled_records):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5, abs=1e-6)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5)


def test_auto_resume_follows_latest_after_a_resume_from_an_earlier_checkpoint(tmp_path, caplog):
    """A run went to step 4 (best there); it is resumed from step 2 and saves step 3: --auto_resume
    continues from 3, not from the abandoned 4, which rotation moves aside (with its best) rather
    than keep as the newest or delete."""
    run_dir = tmp_path / "run"
    for step in (2, 4):
        ckpt.begin_checkpoint(run_dir, step)
        ckpt.finish_checkpoint(run_dir, step, {"global_step": step})
    ckpt.mark_best(run_dir, run_dir / "checkpoint-0000004")
    ckpt.begin_checkpoint(run_dir, 3)
    current = ckpt.finish_checkpoint(run_dir, 3, {"global_step": 3})
    assert ckpt.latest_checkpoint(run_dir) == current
    with caplog.at_level("WARNING"):
        ckpt.rotate_checkpoints(run_dir, keep_last=1, current=current)
    assert ckpt.list_checkpoints(run_dir) == [current] and ckpt.latest_checkpoint(run_dir) == current
    assert ckpt.best_checkpoint(run_dir) is None
    [aside] = run_dir.glob("abandoned-*")
    assert ckpt.read_state(aside / "checkpoint-0000004")["global_step"] == 4
    assert ckpt.best_checkpoint(aside) == aside / "checkpoint-0000004"
    assert "checkpoint-0000004" in caplog.text and str(aside) in caplog.text
    (run_dir / ckpt.LATEST_FILE).unlink()  # no pointer: the highest complete checkpoint
    ckpt.begin_checkpoint(run_dir, 1)
    ckpt.finish_checkpoint(run_dir, 1, {"global_step": 1})
    (run_dir / ckpt.LATEST_FILE).write_text("checkpoint-0000009\n")  # names none: the highest as well
    assert ckpt.latest_checkpoint(run_dir) == current


def test_a_checkpoint_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    """Every file and directory of a checkpoint is flushed (fsync) before the rename that makes it
    complete, and the run directory after it; a checkpoint of the same step is replaced whole."""
    run_dir = tmp_path / "run"
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b)))
    tmp = ckpt.begin_checkpoint(run_dir, 5)
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "weights.bin").write_bytes(b"new")
    final = ckpt.finish_checkpoint(run_dir, 5, {"global_step": 5})
    flushed = [event[1] for event in events if event[0] == "fsync"]
    [rename_at] = [i for i, event in enumerate(events) if event[0] == "rename"]
    before = {Path(p).relative_to(tmp) for p in flushed[:rename_at] if Path(p).is_relative_to(tmp)}
    assert before == {Path("adapter/weights.bin"), Path(ckpt.STATE_FILE), Path("adapter"), Path(".")}
    assert str(run_dir) in flushed[rename_at:]
    # The same step again (a rerun): the new content replaces the old, nothing of either is left over.
    tmp = ckpt.begin_checkpoint(run_dir, 5)
    (tmp / "other.bin").write_bytes(b"newer")
    assert ckpt.finish_checkpoint(run_dir, 5, {"global_step": 5}) == final
    assert sorted(p.name for p in final.iterdir()) == ["other.bin", ckpt.STATE_FILE]
    assert sorted(p.name for p in run_dir.iterdir()) == [final.name, ckpt.LATEST_FILE]


def test_resuming_a_lora_checkpoint_loads_the_base_model_from_version(tiny_vlm_dir, tmp_path):
    """A cluster job that stages the base model elsewhere resumes with --version naming the new place."""
    import shutil

    from model.sam import build_sam
    from utils.train_args import build_parser
    from utils.trainer import build_model

    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), tmp_path / "sam_tiny.pth")
    base = shutil.copytree(tiny_vlm_dir(), tmp_path / "base")
    flags = ["--vision_pretrained", str(tmp_path / "sam_tiny.pth"), "--vision_model", "tiny"]
    model = build_model(build_parser().parse_args(["--version", str(base), *flags]), None, torch.float32, "cpu")
    model.save_pretrained(tmp_path / "checkpoint", include_sam=False)
    assert (tmp_path / "checkpoint" / "adapter").is_dir()  # LoRA: the base model is referenced by its path
    staged = shutil.move(base, tmp_path / "staged")
    args = build_parser().parse_args(["--version", str(staged), *flags])
    resumed = build_model(args, tmp_path / "checkpoint", torch.float32, "cpu")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == {n for n, p in resumed.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("version, base_model", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),  # a hub id: the hub cache holds the model
    ("staged/on/local_disk", None),  # neither a directory nor a hub id: the checkpoint's recorded path
])
def test_resuming_passes_a_hub_id_version_as_the_base_model(tmp_path, monkeypatch, version, base_model):
    """A run trained from a local copy of the base model resumes with --version owner/name."""
    from utils import trainer
    from utils.train_args import build_parser

    class Loaded(Exception):
        pass

    seen = {}

    def from_pretrained(directory, **kwargs):
        seen.update(kwargs, directory=directory)
        raise Loaded

    monkeypatch.setattr(trainer.ReasonSegmenter, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded):
        trainer.build_model(build_parser().parse_args(["--version", version]), tmp_path / "checkpoint", torch.float32, "cpu")
    assert seen["directory"] == tmp_path / "checkpoint" and seen["base_model"] == base_model


def test_a_resumed_run_keeps_the_tensorboard_events_of_its_checkpoint_step(tiny_segmenter_dir, tmp_path):
    """Events of steps after the checkpoint are dropped (the resumed run logs them again), the
    checkpoint's own step is kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.distributed import DistInfo
    from utils.train_args import parse_args
    from utils.trainer import Trainer

    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    flags = ["--version", str(tiny_segmenter_dir()), "--dataset_dir", str(tmp_path), "--log_base_dir", str(tmp_path),
             "--exp_name", "tb", "--no_eval"]
    trainer = Trainer(parse_args(flags), cpu, None, None)
    for step in (1, 2, 3):
        trainer.writer.add_scalar("train/loss", float(step), step)
        if step == 2:
            trainer.global_step = 2
            checkpoint = trainer.save_checkpoint()
    trainer.close()  # killed after logging step 3, before its checkpoint
    time.sleep(1.1)  # event files are read in name order, which starts with the second they were made
    resumed = Trainer(parse_args([*flags, "--resume", str(checkpoint)]), cpu, None, None)
    resumed.writer.add_scalar("train/loss", 30.0, 3)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
