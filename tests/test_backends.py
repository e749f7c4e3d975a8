"""The trainer's backend seam (utils/backends.py): which backend a run gets, and DDPBackend's step.

DeepSpeed itself and DDP across processes run in tests/test_train.py (torchrun); here a linear
layer stands in for the model.
"""

import argparse
import json

import pytest
import torch

import utils.trainer as trainer_module
from utils.backends import LOSS_SCALER_FILE, DDPBackend
from utils.distributed import DistInfo
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
