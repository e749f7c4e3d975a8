"""The training loop behind train_ddp.py: DDP (or DeepSpeed ZeRO-2), exact resume, preemption-safe.

Data order is a pure function of (seed, epoch, rank, index) (see ``utils.data.hybrid``): optimizer
step ``s`` of epoch ``e`` on rank ``r`` always reads items ``[s * b * a, (s + 1) * b * a)`` of that
rank's epoch stream (b = batch size, a = accumulation). A checkpoint stores the global step, the
optimizer, scheduler, the fp16 loss scaler and every rank's torch RNG (LoRA dropout), so a resumed
run continues with the same batches, the same dropout masks and therefore the same weights and
losses.

DDP and DeepSpeed sit behind one seam, ``utils.backends.TrainingBackend``: the step below is
written once, in the order it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.batch import SampleEncoder, to_device
from model.config import SegmenterConfig
from model.image_cache import FeatureCache
from model.image_tokens import PixelLimits, apply_pixel_limits, pixel_limits
from model.sam_compile import compile_image_encoder_as_asked
from model.segmenter import ReasonSegmenter
from model.vlm import LoraSettings, is_hub_id, parse_target_modules
from utils import checkpoint as ckpt
from utils.backends import DDPBackend, DeepSpeedBackend, TrainingBackend, deepspeed_config
from utils.data.builders import build_train_dataset, build_val_dataset
from utils.distributed import DistInfo, all_reduce_sum, barrier, ignore_stop_signals
from utils.evaluation import autocast_context, evaluate_teacher_forced
from utils.mixed_precision import PRECISIONS, NoLossScaling, loss_scaling_for
from utils.optim import build_optimizer, build_scheduler
from utils.train_args import accumulation_for, check_resume_compatible

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOGGED_LOSSES = ("loss", "ce_loss", "bce_loss", "dice_loss")  # the model output's losses, in each step's record


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    return LoraSettings(
        r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
        target_modules=parse_target_modules(args.lora_target_modules),
    )


def training_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of the frozen weights in training: ``--precision`` on CUDA, float32 on the CPU.

    The CPU trains without autocast, in float32, whatever ``--precision`` says.
    """
    if device.type != "cuda":
        return torch.float32
    return PRECISIONS[precision]


def build_datasets(args: argparse.Namespace, dist: DistInfo) -> tuple:
    """The raw training data of this rank (None with ``--eval_only``) and the validation data
    (None with ``--no_eval``), for :class:`Trainer`.

    A rank's epoch holds exactly the samples its optimizer steps read (see the module docstring).
    """
    per_rank_samples = args.steps_per_epoch * args.batch_size * accumulation_for(args, dist.world_size)
    try:
        train_data = None
        if not args.eval_only:
            train_data = build_train_dataset(args, samples_per_epoch=per_rank_samples, seed=args.seed, rank=dist.rank)
        val_data = None
        if not args.no_eval:
            val_data = build_val_dataset(
                args.val_dataset, args.dataset_dir, reason_seg_queries=args.reason_seg_queries,
                answer_style=args.answer_style,
            )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"data configuration error: {error}") from None
    return train_data, val_data


def build_model(
    args: argparse.Namespace,
    resume_from: Path | None,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
) -> ReasonSegmenter:
    """The model to train: resumed, from a segmenter directory, or from Qwen-VL + SAM.

    Read straight into place on ``device``: frozen weights in ``dtype``, trainable ones in
    float32 (master weights; see :meth:`ReasonSegmenter.cast_for_run`). No float32 copy of the
    frozen model is ever made.
    """
    # Recorded on the config, so that every checkpoint says how it was trained (test.py reads answer_style,
    # every path reads seg_state).
    recorded = dict(
        ce_weight=args.ce_loss_weight, bce_weight=args.bce_loss_weight, dice_weight=args.dice_loss_weight,
        answer_style=args.answer_style,
    )
    if resume_from is not None:
        # A LoRA checkpoint names its base model's path; --version, when a plain Qwen-VL directory or
        # hub id, is where that model is now (e.g. staged to local disk by a cluster job, or a run
        # trained from a local copy resumed from the hub).
        plain_version = is_hub_id(args.version) or (
            Path(args.version).is_dir() and not SegmenterConfig.is_segmenter_directory(args.version)
        )
        model = ReasonSegmenter.from_pretrained(
            resume_from, dtype=dtype, is_trainable=True, base_model=args.version if plain_version else None,
            sam_checkpoint=args.vision_pretrained, device=device, train_language_model=args.train_language_model,
        )
    elif SegmenterConfig.is_segmenter_directory(args.version):
        model = ReasonSegmenter.from_pretrained(
            args.version, dtype=dtype, is_trainable=True, sam_checkpoint=args.vision_pretrained, device=device,
            train_language_model=args.train_language_model,
        )
        model.configure_training(lora_settings(args), args.train_language_model)
    else:
        from model.sam import infer_variant_from_checkpoint

        variant = args.vision_model or infer_variant_from_checkpoint(args.vision_pretrained)
        model = ReasonSegmenter.from_components(
            args.version,
            variant,
            args.vision_pretrained,
            lora=lora_settings(args),
            train_language_model=args.train_language_model,
            dtype=dtype,
            device=device,
        )
    model.cast_for_run(dtype)  # the LoRA just added is float32 already: a check, not a copy
    if args.seg_state is not None:
        recorded["seg_state"] = args.seg_state
    for name, value in recorded.items():
        setattr(model.config, name, value)
    return model


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after the current step (or at once during validation), "
                       "then exiting", self.signal_name)


@dataclass
class _StepTotals:
    """What the micro-batches of one optimizer step add up to, on one rank or summed over all."""

    skipped_by_source: dict[str, float]  # the unreadable samples of each training source
    # Each the mean over the micro-batches (and, once summed, over the ranks).
    losses: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOGGED_LOSSES, 0.0))
    samples: float = 0
    skipped: float = 0  # unreadable samples that others replaced
    nonfinite: bool = False  # a non-finite loss: the step is skipped
    stop: bool = False  # SIGTERM / SIGINT: save and exit after the step


class Trainer:
    def __init__(self, args: argparse.Namespace, dist_info: DistInfo, train_data, val_data) -> None:
        """
        Args:
            train_data: a ``HybridDataset`` of raw samples (its transform is set here).
            val_data: a raw validation dataset, or None.
        """
        self.args = args
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(args.log_base_dir) / args.exp_name
        self.accumulation = accumulation_for(args, dist_info.world_size)
        self.total_steps = args.max_steps or args.epochs * args.steps_per_epoch
        self.stop = _StopRequest()
        self.global_step = 0
        self.best_giou = -1.0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.samples_seen = 0
        self.samples_skipped = 0
        self.overflow_total = 0  # fp16 steps skipped by the loss scaling (gradient overflow)
        # Skipped samples per training source (cumulative, summed over ranks like samples_skipped).
        self.source_names = list(getattr(train_data, "source_names", None) or [])
        self.skipped_by_source = dict.fromkeys(self.source_names, 0)

        torch.manual_seed(args.seed + dist_info.rank)
        resume_from = self._resume_checkpoint()
        saved_state = ckpt.read_state(resume_from) if resume_from else None
        if saved_state:
            check_resume_compatible(saved_state.get("args", {}), args, resume_from)
        # Loaded in place: frozen weights in the run dtype (bf16 on CUDA by default), trainable
        # ones in float32 (master weights); never a float32 copy of the whole model.
        dtype = training_dtype(self.device, args.precision)
        self.model = build_model(args, resume_from, dtype=dtype, device=self.device)
        # Before any data is encoded: every checkpoint's processor saves the limits used.
        self.pixel_limits = training_pixel_limits(self.model.processor, args, resumed=saved_state is not None)
        if args.gradient_checkpointing:
            self.model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.vlm.enable_input_require_grads()
        compile_image_encoder_as_asked(self.model.sam.image_encoder, args.compile_sam, self.device)  # default: on CUDA
        # SAM's image encoder is frozen: a picture seen again can reuse its embedding.
        self.sam_features = FeatureCache(args.sam_feature_cache, training=True).attach(self.model) if args.sam_feature_cache else None
        self.backend = training_backend(args, dist_info, self.model, self.accumulation, self.total_steps)
        if saved_state:
            self._load_training_state(resume_from, saved_state)

        self.train_data = train_data
        if train_data is not None:
            train_data.transform = SampleEncoder(
                self.model.processor, self.model.sam_transform, conversation_mode=args.conversation_mode
            )
            train_data.set_rank(dist_info.rank)
        self.val_data = val_data
        self.writer = None
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "run_config.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
            from torch.utils.tensorboard import SummaryWriter

            # Resumed: the events logged after the checkpoint's step are dropped (they come again), not its own.
            purge_step = self.global_step + 1 if self.global_step else None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    # ------------------------------------------------------------------ set-up

    def describe(self) -> str:
        args, world = self.args, self.dist.world_size
        effective = args.batch_size * self.accumulation * world
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (
            f"effective batch {effective} = batch_size {args.batch_size} x accumulation {self.accumulation} x "
            f"{world} processes; {self.total_steps} optimizer steps; {trainable:,} trainable parameters; "
            f"device {self.device}; {self.backend.name}"
        )

    def _resume_checkpoint(self) -> Path | None:
        if self.args.resume:
            path = Path(self.args.resume)
            if not ckpt.is_complete(path):
                raise SystemExit(f"--resume {path}: not a complete checkpoint (no {ckpt.STATE_FILE})")
            return path
        if self.args.auto_resume:
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is not None:
                logger.info("auto-resume from %s", latest)
            return latest
        return None

    def _load_training_state(self, checkpoint: Path, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.best_giou = float(state.get("best_giou", -1.0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.samples_skipped = int(state.get("samples_skipped", 0))
        self.overflow_total = int(state.get("overflow_total", 0))
        for name, count in (state.get("skipped_by_source") or {}).items():
            self.skipped_by_source[name] = int(count)
        self.backend.load(checkpoint)
        rng_file = checkpoint / f"rng_state_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            rng = ckpt.load_torch(rng_file)
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            logger.warning("%s missing (another number of processes?): dropout noise will differ", rng_file.name)
        logger.info("resumed from %s at step %d", checkpoint, self.global_step)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train until ``total_steps``; returns the last validation scores (or {})."""
        args = self.args
        self.stop.install()
        logger.info(self.describe())
        scores: dict = {}
        per_step = args.batch_size * self.accumulation
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="train", disable=not self.dist.is_main)
        self.model.train()
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, args.steps_per_epoch)
            self.train_data.set_epoch(epoch)
            loader = DataLoader(
                self.train_data,
                batch_size=args.batch_size,
                sampler=range(step_in_epoch * per_step, args.steps_per_epoch * per_step),
                collate_fn=partial(self.model.collate, padding_side="right"),
                num_workers=args.workers,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=ignore_stop_signals,
                # Its own generator: drawing worker seeds from the global RNG would shift the
                # dropout noise of a resumed run (its loader starts at another step).
                generator=torch.Generator().manual_seed(args.seed * 1000 + epoch),
            )
            batches = iter(loader)
            while step_in_epoch < args.steps_per_epoch and self.global_step < self.total_steps:
                started = time.perf_counter()
                micro_batches = [next(batches) for _ in range(self.accumulation)]
                record = self._optimizer_step(micro_batches)
                self.global_step += 1
                step_in_epoch += 1
                record["step_seconds"] = time.perf_counter() - started  # data wait included
                record["samples_per_second"] = record["samples"] / max(record["step_seconds"], 1e-9)
                if self.device.type == "cuda":  # this process's peak during the step
                    record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    torch.cuda.reset_peak_memory_stats(self.device)
                self._log(record)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                last = self.global_step >= self.total_steps
                validate = not args.no_eval and self.val_data is not None and (
                    last or (args.eval_steps and self.global_step % args.eval_steps == 0)
                )
                stop = record["stop"]
                if validate:
                    scores = self.validate()
                    if scores is None:  # a signal cut it short (every rank knows): save and exit now
                        scores, stop = {}, True
                periodic = args.save_steps and self.global_step % args.save_steps == 0
                if last or validate or periodic or stop:
                    self.save_checkpoint(scores.get("giou") if validate else None)
                if stop:
                    logger.warning("stopped at step %d on %s; resume with --auto_resume", self.global_step, self.stop.signal_name or "a signal")
                    progress.close()
                    return scores
        progress.close()
        return scores

    def _optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns its log record."""
        on_this_rank, image_tokens = self._accumulate(micro_batches)
        totals = self._sum_over_ranks(on_this_rank)
        lr = self.backend.lr  # the rate this step uses
        # Clip, step, zero the gradients, step the schedule. A non-finite loss (data, or a
        # diverging model) skips the step here; an fp16 gradient overflow is found by the loss
        # scaling, which skips the step and lowers its scale.
        grad_norm, overflow = self.backend.step(skip=totals.nonfinite)
        self._update_counters(totals, overflow)
        return self._step_record(totals, lr, grad_norm, image_tokens)

    def _accumulate(self, micro_batches: list[dict]) -> tuple[_StepTotals, list[int]]:
        """Forward and backward of each micro-batch; this rank's totals and image tokens per image."""
        totals = _StepTotals(skipped_by_source=dict.fromkeys(self.source_names, 0))
        image_tokens: list[int] = []
        for index, batch in enumerate(micro_batches):
            final = index == len(micro_batches) - 1
            totals.samples += len(batch["masks"])
            image_tokens += self.model.image_token_counts(batch)
            for extra in batch["extra"]:
                count = int(extra.get("num_skipped", 0))
                totals.skipped += count
                source = (extra.get("meta") or {}).get("source")
                if count and source in totals.skipped_by_source:
                    totals.skipped_by_source[source] += count
            batch = to_device(batch, self.device)
            with self.backend.no_sync(final):  # gradients are all-reduced on the last micro-batch only
                with autocast_context(self.device, self.args.precision):
                    output = self.backend.forward(batch)
                totals.nonfinite |= not bool(torch.isfinite(output.loss))
                self.backend.backward(output.loss, len(micro_batches), final)
            for key in totals.losses:
                totals.losses[key] += float(getattr(output, key).detach()) / len(micro_batches)
        totals.stop = self.stop.requested
        return totals, image_tokens

    def _sum_over_ranks(self, local: _StepTotals) -> _StepTotals:
        """The step's totals over every rank, its losses averaged: so every rank takes the same decisions.

        One all-reduce carries the losses, the counters and the flags of every rank.
        """
        reduced = all_reduce_sum(
            [*local.losses.values(), local.samples, local.skipped, float(local.nonfinite), float(local.stop),
             *local.skipped_by_source.values()],
            self.device,
        )
        n_losses = len(local.losses)
        samples, skipped, nonfinite, stop = reduced[n_losses:n_losses + 4]
        return _StepTotals(
            losses={key: value / self.dist.world_size for key, value in zip(local.losses, reduced)},
            samples=samples,
            skipped=skipped,
            skipped_by_source=dict(zip(local.skipped_by_source, reduced[n_losses + 4:])),
            nonfinite=nonfinite > 0,
            stop=stop > 0,
        )

    def _update_counters(self, totals: _StepTotals, overflow: bool) -> None:
        """Add the step to the run's counters; stop the run on too many non-finite losses in a row,
        or when too large a share of the samples could not be read."""
        self.samples_seen += int(totals.samples)
        self.samples_skipped += int(totals.skipped)
        for name, count in totals.skipped_by_source.items():
            self.skipped_by_source[name] = self.skipped_by_source.get(name, 0) + int(count)
        if overflow:
            self.overflow_total += 1
            logger.info("fp16 gradient overflow at step %d: step skipped, loss scale lowered", self.global_step + 1)
        if totals.nonfinite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            logger.warning("non-finite loss at step %d: step skipped (%d in a row)", self.global_step + 1, self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row > self.args.max_nonfinite_steps:
                raise SystemExit(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row (--max_nonfinite_steps "
                    f"{self.args.max_nonfinite_steps}): lower --lr or check the data"
                )
        else:
            self.nonfinite_in_a_row = 0
        attempted = self.samples_seen + self.samples_skipped
        if attempted >= 50 and self.samples_skipped / attempted > self.args.max_skipped_share:
            by_source = ", ".join(f"{name} {count}" for name, count in self.skipped_by_source.items() if count)
            raise SystemExit(
                f"{self.samples_skipped} of {attempted} samples were unreadable ({by_source}), more than "
                f"--max_skipped_share {self.args.max_skipped_share}: check --dataset_dir (tools/inspect_data.py "
                "shows what is read)"
            )

    def _step_record(self, totals: _StepTotals, lr: float, grad_norm: float, image_tokens: list[int]) -> dict:
        """The step's line of metrics.jsonl (the loop adds its timing)."""
        record = dict(totals.losses)
        record.update(
            step=self.global_step + 1,
            lr=lr,
            grad_norm=grad_norm,
            samples=totals.samples,
            skipped_samples=self.samples_skipped,
            skipped_by_source=dict(self.skipped_by_source),
            nonfinite_steps=self.nonfinite_total,
            overflow_steps=self.overflow_total,
            stop=totals.stop,
        )
        if self.sam_features is not None:
            stats = self.sam_features.stats
            record["sam_cache_hit_rate"] = stats["sam_hits"] / max(1, stats["sam_hits"] + stats["sam_misses"])
        scale = self.backend.loss_scale
        if scale is not None:
            record["loss_scale"] = scale
        record.update(self._image_token_stats(image_tokens))
        return record

    def _image_token_stats(self, counts: list[int]) -> dict:
        """Mean and max image tokens per image of this step's micro-batches, over all ranks."""
        total, number = all_reduce_sum([float(sum(counts)), float(len(counts))], self.device)
        largest = torch.tensor([float(max(counts, default=0))], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        return {"image_tokens_mean": total / number if number else 0.0, "image_tokens_max": int(largest.item())}

    # ------------------------------------------------------------------ logging, validation, checkpoints

    def _append_metrics(self, kind: str, record: dict) -> None:
        """One line of metrics.jsonl (main process only): ``kind`` "train" or "val", then ``record``."""
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps({"kind": kind, **record}) + "\n")

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self._append_metrics("train", {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()})
        if self.writer is not None and (record["step"] % max(1, self.args.log_steps) == 0 or record["step"] == 1):
            for key in (*LOGGED_LOSSES, "lr", "grad_norm", "samples_per_second", "skipped_samples", "nonfinite_steps"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            for name, count in record.get("skipped_by_source", {}).items():
                self.writer.add_scalar(f"train/skipped_samples/{name}", count, record["step"])
            if "loss_scale" in record:
                self.writer.add_scalar("train/loss_scale", record["loss_scale"], record["step"])
                self.writer.add_scalar("train/overflow_steps", record["overflow_steps"], record["step"])
            for key in ("image_tokens_mean", "image_tokens_max", "step_seconds", "peak_gpu_memory_gb"):
                if key in record:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            self.writer.flush()

    def validate(self) -> dict | None:
        """Teacher-forced validation on every rank's shard; the model returns to training mode.
        None when SIGTERM / SIGINT stopped it (on every rank, then).

        The numbers test.py prints for the same model and split (its defaults): the same split
        (``--reason_seg_queries``, first query of each ReasonSeg image by default), the same
        evaluation code and batch size (``--val_batch_size`` 1). ``best`` is chosen on them.
        """
        data = self.val_data
        if self.args.max_val_samples:
            data = torch.utils.data.Subset(data, range(min(len(data), self.args.max_val_samples)))
        scores = evaluate_teacher_forced(
            self.model,
            data,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            batch_size=self.args.val_batch_size,
            workers=min(self.args.workers, 2),
            precision=self.args.precision,
            description=f"validate {self.args.val_dataset}",
            show_progress=self.dist.is_main,
            # A signal cuts validation short: torchrun kills its workers 30 s after forwarding it,
            # and the checkpoint must be written first.
            should_stop=lambda: self.stop.requested,
        )
        if scores.get("interrupted"):
            logger.warning("validation at step %d stopped by a signal after %d items: not scored, not logged",
                           self.global_step, scores["items"])
            return None
        if self.dist.is_main:
            logger.info(
                "step %d validation on %s (teacher_forced): gIoU %.4f cIoU %.4f over %d masks",
                self.global_step, self.args.val_dataset, scores["giou"], scores["ciou"], scores["count"],
            )
            self._append_metrics(
                "val", {"step": self.global_step, "protocol": "teacher_forced", "split": self.args.val_dataset, **_plain(scores)}
            )
            if self.writer is not None:
                for key in ("giou", "ciou"):
                    self.writer.add_scalar(f"val/{key}", scores[key], self.global_step)
                self.writer.flush()
        return scores

    def save_checkpoint(self, giou: float | None = None) -> Path | None:
        """Write the checkpoint of the current step (all ranks call this)."""
        step = self.global_step
        if self.dist.is_main:
            ckpt.begin_checkpoint(self.run_dir, step)
        barrier()  # every rank writes into the directory the main process made
        tmp = ckpt.temporary_path(self.run_dir, step)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        ckpt.save_torch(rng, tmp / f"rng_state_rank{self.dist.rank}.pt")
        self.backend.save(tmp)  # optimizer, scheduler, loss scale
        if self.dist.is_main:
            self.model.save_pretrained(tmp, include_sam=False)
        barrier()
        final = None
        if self.dist.is_main:
            improved = giou is not None and giou > self.best_giou
            if improved:
                self.best_giou = giou
            state = {
                "global_step": step,
                "epoch": step // self.args.steps_per_epoch,
                "best_giou": self.best_giou,
                "last_giou": giou,
                "nonfinite_total": self.nonfinite_total,
                "samples_seen": self.samples_seen,
                "samples_skipped": self.samples_skipped,
                "skipped_by_source": dict(self.skipped_by_source),
                "overflow_total": self.overflow_total,
                "world_size": self.dist.world_size,
                "accumulation": self.accumulation,
                "args": {k: v for k, v in vars(self.args).items()},
            }
            final = ckpt.finish_checkpoint(self.run_dir, step, state)
            if improved:
                ckpt.mark_best(self.run_dir, final)
            ckpt.rotate_checkpoints(self.run_dir, self.args.save_total_limit, final)
            logger.info("saved %s%s", final, " (best so far)" if improved else "")
        barrier()
        return final

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def training_backend(
    args: argparse.Namespace, dist: DistInfo, model: torch.nn.Module, accumulation: int, total_steps: int
) -> TrainingBackend:
    """The backend of a run: DeepSpeed with ``--deepspeed``, else DDP (or a single process).

    Both get AdamW over the trainable parameters and the learning-rate schedule. Without DeepSpeed
    fp16 gets a GradScaler (DeepSpeed scales its loss itself); fp32 / bf16 need no loss scaling.
    """
    optimizer = build_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2))
    scheduler = build_scheduler(optimizer, args.warmup_steps, total_steps, args.lr_schedule)
    if args.deepspeed:
        config = deepspeed_config(
            args.deepspeed, args.batch_size, accumulation, dist.world_size, args.max_grad_norm, dist.device, args.precision
        )
        return DeepSpeedBackend(model, optimizer, scheduler, config)
    loss_scaling = NoLossScaling()
    if not args.eval_only:
        try:
            loss_scaling = loss_scaling_for(dist.device, args.precision)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    return DDPBackend(model, optimizer, scheduler, loss_scaling, args.max_grad_norm, dist)


def training_pixel_limits(processor, args: argparse.Namespace, resumed: bool = False) -> PixelLimits:
    """Apply ``--min_pixels`` / ``--max_pixels`` to the processor the run encodes its data with.

    A new run: a flag wins, else the model's saved value with the maximum capped at
    ``model.image_tokens.DEFAULT_MAX_IMAGE_TOKENS`` tokens. A resumed run keeps the values its
    checkpoint's processor saved (not capped again) unless a flag is given; a flag that changes
    them is logged, since the images are then seen at another resolution than before.
    """
    before = pixel_limits(processor)
    try:
        limits = apply_pixel_limits(
            processor, getattr(args, "min_pixels", None), getattr(args, "max_pixels", None), cap_saved=not resumed
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if resumed and (limits.min_pixels, limits.max_pixels) != (before.min_pixels, before.max_pixels):
        logger.warning(
            "resuming with other pixel limits than the checkpoint's (%s; it used %s): images are now "
            "encoded at another resolution", limits.describe(), before.describe(),
        )
    return limits


def _plain(scores: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()}


__all__ = ["Trainer", "build_datasets", "build_model", "lora_settings", "training_backend"]
