"""Loss scaling for mixed-precision training, behind one small interface.

``--precision`` picks what the training step does with its loss and gradients:

* ``fp32`` and ``bf16``: nothing (bf16 has fp32's exponent range, so its gradients do not
  underflow). :class:`NoLossScaling` passes everything through.
* ``fp16`` on CUDA: fp16's smallest normal number is 6e-5 (subnormals end at 6e-8), so small
  gradients computed in fp16 become zero. :class:`DynamicLossScaling` (a ``torch.amp.GradScaler``)
  multiplies the loss before ``backward``, divides the gradients back before clipping, and
  skips the optimizer step when the scaled gradients overflowed (inf/nan), halving the scale;
  the scale grows again after ``growth_interval`` clean steps. An overflow is the scaler's
  business, not a data problem: the trainer counts it apart from non-finite losses.
* ``fp16`` on CPU is refused (:func:`precision_problem`): the trainer does not autocast on CPU
  (it would train fp32 while claiming fp16), and fp16 arithmetic on CPUs is slow and has no use
  here. Use ``--precision fp32`` (or ``bf16``, which also runs fp32 on CPU).

Under DeepSpeed the engine does its own loss scaling: :func:`deepspeed_precision_config` sets
its ``fp16`` section (dynamic scaling: ``loss_scale`` 0) or its ``bf16`` section.

The DDP backend (``utils.backends.DDPBackend``) calls, once per optimizer step::

    scaling.backward(loss)                 # each micro-step
    scaling.unscale_(optimizer)            # before clipping
    applied = scaling.step(optimizer)      # False: an overflow, the step was skipped
"""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The ``--precision`` values and the dtype each computes in on CUDA (the CPU trains in float32)."""


def precision_problem(precision: str, device_type: str) -> str | None:
    """Why ``--precision`` cannot train on ``device_type`` (None when it can)."""
    if precision not in PRECISIONS:
        return f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "fp16" and device_type != "cuda":
        return (
            f"--precision fp16 trains only on a CUDA GPU (fp16 autocast with loss scaling); this run is on "
            f"{device_type}: use --precision fp32 (or bf16, which runs fp32 on CPU)"
        )
    return None


class NoLossScaling:
    """fp32 / bf16: the loss and the gradients as they are; every step is applied."""

    enabled = False

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    @property
    def scale(self) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DynamicLossScaling(NoLossScaling):
    """fp16: ``torch.amp.GradScaler`` (dynamic scale, overflowing steps skipped).

    ``device_type`` is ``"cuda"`` for training; ``"cpu"`` works too (torch's GradScaler supports
    it), which is how the tests check this class on machines without a GPU.
    """

    enabled = True

    def __init__(self, device_type: str = "cuda", **scaler_options) -> None:
        self.scaler = torch.amp.GradScaler(device_type, **scaler_options)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)  # the gradients in true units (inf/nan recorded)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step unless the gradients overflowed; update the scale. Returns whether it stepped."""
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscales if not done yet; skipped when an inf/nan was found while unscaling
        self.scaler.update()  # lowers the scale after an overflow, else may grow it
        return self.scaler.get_scale() >= before

    @property
    def scale(self) -> float | None:
        return float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


def loss_scaling_for(device: torch.device, precision: str) -> NoLossScaling:
    """The loss scaling of a run (raises ValueError for a precision that cannot train there)."""
    problem = precision_problem(precision, device.type)
    if problem:
        raise ValueError(problem)
    return DynamicLossScaling(device.type) if precision == "fp16" else NoLossScaling()


def deepspeed_precision_config(config: dict, device: torch.device, precision: str) -> dict:
    """Set DeepSpeed's ``bf16`` and ``fp16`` sections for ``precision`` (returns ``config``).

    fp16 keeps any options of the config file's own ``fp16`` section and defaults to dynamic
    loss scaling (``loss_scale`` 0, initial scale 2**16) run by DeepSpeed itself.
    """
    problem = precision_problem(precision, device.type)
    if problem:
        raise ValueError(problem)
    on_cuda = device.type == "cuda"
    config["bf16"] = {**config.get("bf16", {}), "enabled": on_cuda and precision == "bf16"}
    fp16 = {**config.get("fp16", {}), "enabled": on_cuda and precision == "fp16"}
    if fp16["enabled"]:
        fp16.setdefault("loss_scale", 0)  # 0: dynamic
        fp16.setdefault("initial_scale_power", 16)
        fp16.setdefault("loss_scale_window", 1000)
        fp16.setdefault("hysteresis", 2)
        fp16.setdefault("min_loss_scale", 1)
    config["fp16"] = fp16
    return config
