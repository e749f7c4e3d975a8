"""fp16 loss scaling (utils/mixed_precision.py): small gradients survive, overflows skip, flags.

CI has no GPU: the scaler runs with device "cpu" here (torch's GradScaler supports it) and fp16
compute comes from CPU autocast; training itself refuses fp16 on CPU.
"""

import pytest
import torch

from conftest import REPO
from utils.mixed_precision import (
    DynamicLossScaling,
    NoLossScaling,
    deepspeed_precision_config,
    loss_scaling_for,
    precision_problem,
)


def tiny_gradient_problem(seed: int = 0):
    """A linear layer (fp32 master weights) whose true weight gradients are about 1e-8."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 16, generator=generator) * 0.1)
        layer.bias.zero_()
    inputs = torch.randn(8, 16, generator=generator)
    weights = torch.randn(8, 4, generator=generator)

    def loss_fn(module):
        return (module(inputs).float() * weights).sum() * 1e-9  # d loss / d output ~ 1e-9

    return layer, loss_fn


def applied_gradient(scaling, fp16: bool) -> torch.Tensor:
    """The weight gradient the optimizer steps with, after the trainer's sequence for one step
    (backward, unscale, clip, step)."""
    layer, loss_fn = tiny_gradient_problem()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    applied = []
    optimizer.register_step_pre_hook(lambda *_: applied.append(layer.weight.grad.detach().clone()))
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss = loss_fn(layer)
    scaling.backward(loss)
    scaling.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    assert scaling.step(optimizer)
    assert len(applied) == 1
    return applied[0]


def test_loss_scaling_keeps_gradients_that_fp16_flushes_to_zero():
    reference = applied_gradient(NoLossScaling(), fp16=False)
    assert 1e-10 < reference.abs().max() < 1e-7  # gradients of about 1e-8
    unscaled = applied_gradient(NoLossScaling(), fp16=True)
    assert torch.count_nonzero(unscaled) == 0  # below fp16's smallest subnormal (6e-8): all lost
    scaled = applied_gradient(DynamicLossScaling("cpu"), fp16=True)
    assert torch.count_nonzero(scaled) == scaled.numel()
    torch.testing.assert_close(scaled, reference, rtol=2e-2, atol=1e-11)


def test_an_overflow_skips_the_step_and_lowers_the_scale_then_training_goes_on():
    scaling = DynamicLossScaling("cpu", init_scale=2.0**16, growth_interval=2)
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    scaling.backward(layer(torch.full((1, 4), 1e35)).sum() * 1e4)  # inf gradients once scaled
    scaling.unscale_(optimizer)
    assert scaling.step(optimizer) is False
    assert scaling.scale == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    for _ in range(2):  # clean steps apply, and the scale grows back after growth_interval of them
        optimizer.zero_grad()
        scaling.backward(layer(torch.ones(1, 4)).sum())
        assert scaling.step(optimizer) is True
    assert scaling.scale == 2.0**16
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    restored = DynamicLossScaling("cpu")
    restored.load_state_dict(scaling.state_dict())
    assert restored.state_dict() == scaling.state_dict()


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_precision_choices_per_device():
    assert isinstance(loss_scaling_for(torch.device("cpu"), "fp32"), NoLossScaling)
    assert not loss_scaling_for(torch.device("cpu"), "bf16").enabled
    assert isinstance(loss_scaling_for(torch.device("cuda"), "fp16"), DynamicLossScaling)
    message = precision_problem("fp16", "cpu")
    assert "--precision fp16" in message and "--precision fp32" in message and "bf16" in message
    with pytest.raises(ValueError, match="trains only on a CUDA GPU"):
        loss_scaling_for(torch.device("cpu"), "fp16")
    assert precision_problem("fp16", "cuda") is None and precision_problem("bf16", "cpu") is None


def test_deepspeed_gets_its_own_fp16_section_with_dynamic_loss_scaling():
    cuda = torch.device("cuda")
    config = deepspeed_precision_config({"fp16": {"initial_scale_power": 12}}, cuda, "fp16")
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0  # 0: dynamic
    assert config["fp16"]["initial_scale_power"] == 12  # the config file's own value is kept
    assert config["bf16"] == {"enabled": False}
    config = deepspeed_precision_config({}, cuda, "bf16")
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    config = deepspeed_precision_config({}, torch.device("cpu"), "bf16")  # CPU runs fp32
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    with pytest.raises(ValueError, match="CUDA"):
        deepspeed_precision_config({}, torch.device("cpu"), "fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_flag_is_refused_on_cpu_and_the_others_accepted(capsys):
    from utils.train_args import parse_args

    base = ["--version", str(REPO), "--vision_pretrained", __file__, "--dataset_dir", str(REPO)]
    with pytest.raises(SystemExit):
        parse_args(base + ["--precision", "fp16"])
    error = capsys.readouterr().err
    assert "--precision fp16 trains only on a CUDA GPU" in error and "use --precision fp32" in error
    for precision in ("fp32", "bf16"):
        assert parse_args(base + ["--precision", precision]).precision == precision
    # Evaluation only autocasts on CUDA: nothing to refuse.
    assert parse_args(base + ["--precision", "fp16", "--eval_only"]).precision == "fp16"
