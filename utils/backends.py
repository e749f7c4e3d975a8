"""The training step's one seam: DDP (or a single process) and DeepSpeed behind the same few calls.

The trainer's step is written once against :class:`TrainingBackend`::

    for each micro-batch (final: the last one of the optimizer step):
        with backend.no_sync(final):
            output = backend.forward(batch)          # under the trainer's autocast
            backend.backward(output.loss, num_micro, final)
    grad_norm, overflow = backend.step(skip)         # clip, optimizer step, zero, schedule
    backend.lr, backend.loss_scale                   # what the step logs
    backend.name                                     # what the run's first log line names
    backend.save(directory), backend.load(directory) # optimizer, scheduler (and loss scale) state

:class:`DDPBackend` holds the optimizer, the scheduler, the fp16 loss scaling
(``utils.mixed_precision``) and, with torch.distributed, the ``DistributedDataParallel`` wrapper.
:class:`DeepSpeedBackend` holds a DeepSpeed engine, which does all of that itself.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils import checkpoint as ckpt
from utils.distributed import DistInfo
from utils.mixed_precision import NoLossScaling, deepspeed_precision_config

logger = logging.getLogger(__name__)

LOSS_SCALER_FILE = "loss_scaler.pt"  # the fp16 GradScaler's state (scale and growth tracker)
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint inside ours (optimizer partitions of every rank)


class TrainingBackend(Protocol):
    """What the trainer uses of DDP or DeepSpeed: exactly these members."""

    @property
    def name(self) -> str:
        """For the log: ``"DDP"``, ``"single process"`` (:class:`DDPBackend` without torch.distributed)
        or ``"DeepSpeed"``."""

    def forward(self, batch: dict) -> Any:
        """The model's output for ``batch`` (through the DDP wrapper or the engine)."""

    def no_sync(self, final: bool) -> AbstractContextManager:
        """Around a micro-step's forward and backward: no gradient all-reduce unless ``final``."""

    def backward(self, loss: torch.Tensor, num_micro: int, final: bool) -> None:
        """Accumulate the gradients of one of ``num_micro`` micro-steps (``final``: the last)."""

    def step(self, skip: bool) -> tuple[float, bool]:
        """End the optimizer step; ``skip``: leave the weights alone (a non-finite loss).

        Returns the gradient norm (0 for a skipped step) and whether the fp16 loss scaling skipped
        the step because the gradients overflowed (always False in fp32 / bf16).
        """

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (None without loss scaling)."""

    def save(self, directory: Path) -> None:
        """Write the optimizer, scheduler and loss-scale state into a checkpoint (every rank calls this)."""

    def load(self, directory: Path) -> None:
        """Read back what :meth:`save` wrote."""


class DDPBackend:
    """torch's own optimizer, scheduler and fp16 loss scaling; DDP when torch.distributed is up.

    Gradients are divided by the number of micro-steps, clipped to ``max_grad_norm`` (0: no
    clipping) in true units, then applied unless the loss was non-finite or the loss scaling found
    an overflow. Checkpoint files: ``optimizer.pt``, ``scheduler.pt`` and, in fp16,
    ``loss_scaler.pt``, written by rank 0 (every rank holds the same state).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_scaling: NoLossScaling,
        max_grad_norm: float,
        dist: DistInfo,
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_scaling = loss_scaling
        self.max_grad_norm = max_grad_norm
        self.is_main = dist.is_main
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ddp: DistributedDataParallel | None = None
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.module: nn.Module = self.ddp or model
        self.name = "DDP" if self.ddp is not None else "single process"

    def forward(self, batch: dict) -> Any:
        return self.module(batch)

    def no_sync(self, final: bool) -> AbstractContextManager:
        return nullcontext() if (final or self.ddp is None) else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, num_micro: int, final: bool) -> None:
        self.loss_scaling.backward(loss / num_micro)

    def step(self, skip: bool) -> tuple[float, bool]:
        grad_norm, overflow = 0.0, False
        if not skip:
            self.loss_scaling.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if self.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
            overflow = not self.loss_scaling.step(self.optimizer)
            if overflow:
                grad_norm = 0.0  # inf/nan gradients: the step was skipped
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, overflow

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float | None:
        return self.loss_scaling.scale

    def save(self, directory: Path) -> None:
        if not self.is_main:
            return
        ckpt.save_torch(self.optimizer.state_dict(), directory / "optimizer.pt")
        ckpt.save_torch(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.loss_scaling.enabled:
            ckpt.save_torch(self.loss_scaling.state_dict(), directory / LOSS_SCALER_FILE)

    def load(self, directory: Path) -> None:
        self.optimizer.load_state_dict(ckpt.load_torch(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(directory / "scheduler.pt"))
        if self.loss_scaling.enabled:
            scaler_file = directory / LOSS_SCALER_FILE
            if scaler_file.is_file():
                self.loss_scaling.load_state_dict(ckpt.load_torch(scaler_file))
            else:
                logger.warning("%s has no %s (not an fp16 run?): the loss scale starts afresh", directory, LOSS_SCALER_FILE)


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO): it scales, all-reduces, clips and steps by itself.

    The engine counts micro-steps: ``engine.step()`` runs on every one (off the accumulation
    boundary it only counts), and on the boundary it clips, steps the optimizer and the
    scheduler. A step is skipped as DDP skips it: the weights and the optimizer state stay, the
    schedule moves on. DeepSpeed's check for non-finite gradients does the skipping (a config
    without it is refused, see :func:`read_deepspeed_config`): a non-finite loss is made to give
    non-finite gradients. In fp16 that also lowers the loss scale, as an overflow does.
    Checkpoint: DeepSpeed's own, under ``deepspeed/`` (tag ``state``), without the frozen weights.
    """

    name = "DeepSpeed"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: dict,
    ) -> None:
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )

    def forward(self, batch: dict) -> Any:
        return self.engine(batch)

    def no_sync(self, final: bool) -> AbstractContextManager:
        return nullcontext()  # the engine skips the all-reduce off the boundary itself

    def backward(self, loss: torch.Tensor, num_micro: int, final: bool) -> None:
        if not torch.isfinite(loss):
            # Its gradients may still be finite (a NaN term without parameters): ZeRO reduces them
            # into its own buffers, out of reach, so they are made non-finite for the overflow
            # check to reject the step, on every rank.
            loss = loss * float("nan")
        # The engine divides by its accumulation steps (and, in fp16, multiplies by its loss scale).
        self.engine.backward(loss)
        if not final:
            self.engine.step()  # off the boundary: counts the micro-step

    def step(self, skip: bool) -> tuple[float, bool]:
        # The boundary micro-step: clip, then optimizer and scheduler step unless the gradients are
        # non-finite (a non-finite loss, see backward, or an fp16 overflow).
        self.engine.step()
        if self.engine.was_step_applied():
            norm = self.engine.get_global_grad_norm()
            return (float(norm) if norm is not None else 0.0), False
        self.engine.lr_scheduler.step()  # DeepSpeed leaves the schedule alone; DDP's moves on every step
        return 0.0, not skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float | None:
        if not self.engine.fp16_enabled():
            return None
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None

    def save(self, directory: Path) -> None:
        # Optimizer partitions of every rank; the weights themselves are our safetensors.
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(
            str(directory / DEEPSPEED_DIR), tag="state", load_module_strict=False, load_lr_scheduler_states=True
        )


def deepspeed_config(
    path: str | Path,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    max_grad_norm: float,
    device: torch.device,
    precision: str,
) -> dict:
    """The DeepSpeed config file at ``path`` with the run's batch, clipping and precision set."""
    config = read_deepspeed_config(path, device, precision)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch_size * accumulation * world_size
    config["gradient_clipping"] = max_grad_norm
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def read_deepspeed_config(path: str | Path, device: torch.device, precision: str) -> dict:
    """The DeepSpeed config file at ``path`` with its precision sections set for ``precision``.

    Raises ValueError, naming ``--deepspeed`` and the file, for a config the training step cannot
    run: ZeRO stage 3 (it partitions the weights, which the step and the checkpoints use whole),
    or one without DeepSpeed's check for non-finite gradients, which skips the step of a
    non-finite loss (:class:`DeepSpeedBackend`): stage 0 in fp32 has none, and
    ``bf16.check_grad_overflow`` or ``zero_optimization.compute_grad_norm`` false turn it off.
    """
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({error})") from None
    deepspeed_precision_config(config, device, precision)  # bf16, or fp16 with DeepSpeed's loss scaling
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    fp32 = not (config["bf16"]["enabled"] or config["fp16"]["enabled"])
    if stage not in (0, 1, 2):
        problem = f"ZeRO stage {stage} is not supported (stage 3 partitions the weights): use stage 1 or 2"
    elif stage == 0 and fp32:
        problem = "ZeRO stage 0 in fp32 cannot skip the step of a non-finite loss: use stage 1 or 2"
    elif config["bf16"].get("check_grad_overflow") is False or zero.get("compute_grad_norm") is False:
        problem = (
            "bf16.check_grad_overflow / zero_optimization.compute_grad_norm false leave non-finite gradients "
            "unchecked, so the step of a non-finite loss cannot be skipped: remove them"
        )
    else:
        return config
    raise ValueError(f"--deepspeed {path}: {problem} (configs/ds_zero2.json is a working config)")


__all__ = ["DDPBackend", "DeepSpeedBackend", "LOSS_SCALER_FILE", "TrainingBackend", "deepspeed_config", "read_deepspeed_config"]
