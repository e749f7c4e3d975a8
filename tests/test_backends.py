"""The trainer's backend seam (utils/backends.py): which backend a run gets, and each one's step.

A linear layer stands in for the model; the whole trainer under DDP across processes and under
DeepSpeed runs in tests/test_train.py (torchrun).
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import utils.trainer as trainer_module
from conftest import REPO
from utils.backends import LOSS_SCALER_FILE, DDPBackend
from utils.distributed import DistInfo, free_port
from utils.mixed_precision import DynamicLossScaling, NoLossScaling

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def run_args(**overrides) -> argparse.Namespace:
    values = dict(lr=0.1, weight_decay=0.0, beta1=0.9, beta2=0.95, warmup_steps=0, lr_schedule="constant",
                  deepspeed=None, eval_only=False, precision="fp32", max_grad_norm=1.0, batch_size=2)
    return argparse.Namespace(**{**values, **overrides})


def test_a_single_process_gets_ddp_backend_without_a_wrapper_and_fp16_is_refused_on_cpu():
    backend = trainer_module.training_backend(run_args(), CPU, torch.nn.Linear(3, 2), accumulation=1, total_steps=4)
    assert isinstance(backend, DDPBackend) and backend.ddp is None and backend.name == "single process"
    assert isinstance(backend.loss_scaling, NoLossScaling) and backend.loss_scale is None and backend.lr == 0.1
    with pytest.raises(SystemExit, match="--precision fp16 trains only on a CUDA GPU"):
        trainer_module.training_backend(run_args(precision="fp16"), CPU, torch.nn.Linear(3, 2), 1, 4)


def test_deepspeed_flag_selects_deepspeed_with_the_run_batch_and_clipping(tmp_path, monkeypatch):
    config_file = tmp_path / "ds.json"
    config_file.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    built = {}

    def deepspeed_backend(model, optimizer, scheduler, config):
        built.update(config)
        return "ds"

    monkeypatch.setattr(trainer_module, "DeepSpeedBackend", deepspeed_backend)
    backend = trainer_module.training_backend(
        run_args(deepspeed=str(config_file), max_grad_norm=0.5), DistInfo(0, 2, 0, torch.device("cpu")),
        torch.nn.Linear(3, 2), accumulation=3, total_steps=4,
    )
    assert backend == "ds"
    assert built["train_micro_batch_size_per_gpu"] == 2 and built["gradient_accumulation_steps"] == 3
    assert built["train_batch_size"] == 12 and built["gradient_clipping"] == 0.5
    assert built["zero_optimization"] == {"stage": 2} and not built["fp16"]["enabled"]


def test_ddp_backend_accumulates_clips_skips_and_saves_its_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    backend = trainer_module.training_backend(run_args(max_grad_norm=1e-3), CPU, model, accumulation=2, total_steps=4)
    inputs = torch.randn(4, 3)
    expected = torch.autograd.grad(model(inputs).square().mean(), [model.weight, model.bias])
    for half, final in ((inputs[:2], False), (inputs[2:], True)):
        with backend.no_sync(final):
            backend.backward(backend.forward(half).square().mean(), num_micro=2, final=final)
    torch.testing.assert_close(model.weight.grad, expected[0])
    before = model.weight.detach().clone()
    grad_norm, overflow = backend.step(skip=False)
    assert grad_norm == pytest.approx(float(torch.cat([g.flatten() for g in expected]).norm())) and not overflow
    assert not torch.equal(model.weight, before) and model.weight.grad is None

    backend.backward(backend.forward(inputs).sum() * float("nan"), num_micro=1, final=True)
    after_first = model.weight.detach().clone()
    assert backend.step(skip=True) == (0.0, False)  # a non-finite loss: the weights stay, the schedule moves
    assert torch.equal(model.weight, after_first) and model.weight.grad is None
    assert backend.scheduler.last_epoch == 2

    backend.loss_scaling = DynamicLossScaling("cpu")
    backend.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["optimizer.pt", "scheduler.pt", LOSS_SCALER_FILE])
    fresh = trainer_module.training_backend(run_args(max_grad_norm=1e-3), CPU, torch.nn.Linear(3, 2), 2, 4)
    fresh.loss_scaling = DynamicLossScaling("cpu", init_scale=8.0)
    fresh.load(tmp_path)
    assert fresh.scheduler.last_epoch == 2 and fresh.loss_scale == 2.0**16
    assert fresh.optimizer.state_dict()["state"][0]["step"] == backend.optimizer.state_dict()["state"][0]["step"]


def five_steps(deepspeed: str | None) -> dict:
    """Five optimizer steps of two micro-batches on a linear layer, warmup of four steps, under
    DDP or the DeepSpeed config file ``deepspeed``. Step 2's loss is NaN with finite gradients (a
    NaN term without parameters), step 4's has NaN gradients: both are skipped. Returns each step's
    learning rate, whether the weights changed, gradient norm and overflow flag, and the last weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    args = run_args(warmup_steps=4, lr_schedule="linear", deepspeed=deepspeed)
    backend = trainer_module.training_backend(args, CPU, model, accumulation=2, total_steps=8)
    inputs = torch.randn(5, 2, 2, 3, generator=torch.Generator().manual_seed(1))
    steps = []
    for step in range(5):
        lr, before = backend.lr, model.weight.detach().clone()
        for micro in range(2):
            final = micro == 1
            with backend.no_sync(final):
                loss = backend.forward(inputs[step, micro]).square().mean()
                if step == 1 and micro == 0:
                    loss = loss + torch.tensor(float("nan"))
                if step == 3 and final:
                    loss = loss * float("nan")
                backend.backward(loss, 2, final)
        grad_norm, overflow = backend.step(skip=step in (1, 3))
        steps.append([lr, not torch.equal(model.weight, before), grad_norm, overflow])
    return {"steps": steps, "weight": model.weight.tolist()}


def test_deepspeed_skips_the_step_of_a_non_finite_loss_as_ddp_does(tmp_path):
    """A skipped step leaves the weights (and the optimizer state) alone and the schedule moves on,
    under DeepSpeed ZeRO-1 and -2 exactly as under DDP: the same rates, norms and last weights.

    DeepSpeed needs torch.distributed and keeps global state: it runs in a process of its own."""
    configs = {}
    for stage in (1, 2):
        config = json.loads((REPO / "configs" / "ds_zero2.json").read_text())
        config["zero_optimization"]["stage"] = stage
        configs[stage] = tmp_path / f"ds_zero{stage}.json"
        configs[stage].write_text(json.dumps(config))
    script = tmp_path / "steps.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "dist.init_process_group('gloo')\n"
        "from test_backends import five_steps\n"
        f"print(json.dumps([five_steps(config) for config in {[str(c) for c in configs.values()]!r}]))\n"
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    ddp = five_steps(None)
    assert [lr for lr, *_ in ddp["steps"]] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])  # warmup goes on
    assert [changed for _, changed, *_ in ddp["steps"]] == [True, False, True, False, True]
    for stage, run in zip(configs, runs):
        for step, (ours, theirs) in enumerate(zip(run["steps"], ddp["steps"]), start=1):
            assert ours[0] == pytest.approx(theirs[0]), (stage, step)  # learning rate
            assert ours[1:4:2] == theirs[1:4:2], (stage, step)  # weights changed, overflow
            assert ours[2] == pytest.approx(theirs[2], rel=1e-5), (stage, step)  # gradient norm (0: skipped)
        torch.testing.assert_close(torch.tensor(run["weight"]), torch.tensor(ddp["weight"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
        ({"zero_optimization": {"stage": 0}}, "ZeRO stage 0 in fp32 cannot skip"),
        ({}, "ZeRO stage 0 in fp32 cannot skip"),
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm false"),
    ],
)
def test_a_deepspeed_config_the_step_cannot_run_is_refused_before_loading(tmp_path, capsys, config, message):
    from utils.train_args import parse_args

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        trainer_module.training_backend(run_args(deepspeed=str(path)), CPU, torch.nn.Linear(3, 2), 1, 4)
    with pytest.raises(SystemExit):
        parse_args(["--version", str(REPO), "--vision_pretrained", __file__, "--dataset_dir", str(REPO),
                    "--precision", "fp32", "--deepspeed", str(path)])
    error = capsys.readouterr().err
    assert f"--deepspeed {path}: " in error and message in error and "configs/ds_zero2.json" in error
