"""Merge a training checkpoint into one standalone segmenter directory (transform_weight.py).

A training checkpoint (plain DDP or DeepSpeed: the trainer gathers the weights on rank 0 and
writes the same layout either way) holds a peft LoRA adapter with the ``[SEG]`` token rows, the
segmentation head, and the paths of the base Qwen-VL and of the official SAM file. Merging folds
the LoRA and the ``[SEG]`` rows into the base weights and writes a directory that needs nothing
else, and no peft, to run:

    out/config.json          segmenter config (vlm_path "vlm", no adapter, no SAM path)
    out/vlm/                 the merged Qwen-VL (save_pretrained, safetensors), tokenizer and
                             processor with [SEG]
    out/head.safetensors     projection and SAM mask decoder
    out/sam.safetensors      the whole SAM (official key names)

Precision. The model is read straight into the requested dtype (bf16 by default: the dtype
Qwen-VL is published in and the one inference runs in on CUDA), except the adapter (LoRA A/B and
the ``[SEG]`` rows), which is read in float32 as trained. Each merged weight is then
``W + scale * B @ A`` with the product computed in float32 and rounded to bf16 once, when it is
added to the bf16 base weight: the same rounding a bf16 load of a float32 merge would do, at half
the size on disk. ``--precision fp32`` keeps the merged weights unrounded (twice the size; a float32
CPU run then computes exactly what the unmerged checkpoint computes). Everything is written in the
requested dtype (the projection and mask decoder included), except SAM's prompt encoder (float32).

The LoRA settings come from the checkpoint. Flags may restate them; a flag that differs is
reported: ``alpha`` then overrides the scaling (with a warning), ``dropout`` has no effect on a
merge (warning), and ``r`` or the target modules cannot differ from the saved weights (error).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from utils.atomic_files import fsync_tree, move_into_place
from utils.checkpoint import STATE_FILE

from .config import CONFIG_NAME, SegmenterConfig
from .loading import ModelLoadError, resolve_checkpoint

logger = logging.getLogger(__name__)


class MergeError(ModelLoadError):
    """The checkpoint cannot be merged as asked; the message says why."""


def lora_settings_from(directory: Path, config: SegmenterConfig) -> dict:
    """The LoRA settings of a checkpoint: its config's ``lora``, else the adapter's own config."""
    settings = dict(config.lora or {})
    adapter_config = directory / (config.adapter_path or "") / "adapter_config.json"
    if adapter_config.is_file():
        saved = json.loads(adapter_config.read_text(encoding="utf-8"))
        settings.setdefault("r", saved.get("r"))
        settings.setdefault("alpha", saved.get("lora_alpha"))
        settings.setdefault("dropout", saved.get("lora_dropout"))
        settings.setdefault("use_rslora", saved.get("use_rslora", False))
        if "target_modules" not in settings:
            settings["target_modules"] = saved.get("target_modules")
    return settings


def check_lora_overrides(settings: dict, overrides: dict) -> dict:
    """Compare command-line LoRA settings with the checkpoint's.

    Args:
        settings: from :func:`lora_settings_from`.
        overrides: ``r``, ``alpha``, ``dropout``, ``target_modules`` given on the command line
            (None for those not given).
    Returns:
        the overrides to apply (only ``alpha``, when it differs).
    Raises:
        MergeError: ``r`` or ``target_modules`` differ from the saved weights.
    """
    apply = {}
    for name, value in overrides.items():
        if value is None:
            continue
        saved = settings.get(name)
        if name == "target_modules":  # parsed already (model.vlm.parse_target_modules)
            same = saved is not None and sorted(value) == sorted(saved if isinstance(saved, list) else [saved])
        else:
            same = saved is not None and float(value) == float(saved)
        if same:
            continue
        if saved is None:
            logger.warning("--lora_%s %s given, but the checkpoint records no such setting: ignored", name, value)
        elif name in ("r", "target_modules"):
            raise MergeError(
                f"--lora_{name} {value} differs from the checkpoint's {saved}: the adapter's weights were "
                f"trained with {name}={saved} and cannot be merged with another; leave the flag out"
            )
        elif name == "alpha":
            logger.warning(
                "--lora_alpha %s differs from the checkpoint's %s: merging with alpha=%s (scaling alpha/r) "
                "as asked, not the trained value", value, saved, value,
            )
            apply["alpha"] = value
        else:
            logger.warning("--lora_%s %s differs from the checkpoint's %s: it has no effect on a merge", name, value, saved)
    return apply


def set_lora_alpha(peft_model, alpha: float) -> int:
    """Set LoRA alpha (hence the scaling) of every LoRA layer; returns the number of layers."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter, rank in module.r.items():
                rslora = module.use_rslora.get(adapter, False)
                module.lora_alpha[adapter] = alpha
                module.scaling[adapter] = alpha / (rank**0.5 if rslora else rank)
            count += 1
    for config in peft_model.peft_config.values():
        config.lora_alpha = alpha
    return count


def merge_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    sam_checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    lora_overrides: dict | None = None,
    pick: str = "latest",
    overwrite: bool = False,
) -> Path:
    """Write the standalone directory ``out`` from the training checkpoint ``ckpt``.

    Args:
        ckpt: a checkpoint directory, or a run directory with ``checkpoint-*/`` (see
            :func:`model.loading.resolve_checkpoint`; ``pick`` chooses latest or best).
        base_model, sam_checkpoint: override the base Qwen-VL / official SAM paths it records.
        dtype: precision the model is loaded, merged and saved in (the adapter is read and
            multiplied out in float32; see the module doc).
        lora_overrides: LoRA settings restated on the command line (see :func:`check_lora_overrides`).
        overwrite: replace an existing ``out`` segmenter directory.
    Returns:
        ``out``.
    """
    from .segmenter import FinalStateCapture, ReasonSegmenter

    directory = resolve_checkpoint(ckpt, pick)
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise MergeError(f"the output directory {out} is the checkpoint itself; choose another")
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} is a file; --out names a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MergeError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not SegmenterConfig.is_segmenter_directory(out) or (out / STATE_FILE).is_file():
            raise MergeError(f"{out} exists and is not a merged segmenter directory; refusing to overwrite it")
    config = SegmenterConfig.from_pretrained(directory)
    settings = lora_settings_from(directory, config) if config.adapter_path else {}
    to_apply = check_lora_overrides(settings, lora_overrides or {}) if config.adapter_path else {}
    if not config.adapter_path:
        logger.info("%s carries a full VLM (no LoRA adapter): nothing to merge, writing it standalone", directory)
    else:
        logger.info("merging %s (LoRA %s) into its base model", directory, settings)
    try:
        # is_trainable: the adapter and the head are read in float32 (as trained), the rest in dtype.
        model = ReasonSegmenter.from_pretrained(
            directory, dtype=dtype, is_trainable=True, base_model=base_model, sam_checkpoint=sam_checkpoint,
            train_language_model=False,
        )
    except (FileNotFoundError, ValueError, OSError) as err:
        raise MergeError(f"cannot load {directory}: {err}") from err
    except ImportError as err:
        raise MergeError(f"merging a LoRA checkpoint needs peft ({err}): pip install peft") from err
    if config.adapter_path:
        if "alpha" in to_apply:
            set_lora_alpha(model.vlm, to_apply["alpha"])
        model.vlm = model.vlm.merge_and_unload()
        model.capture_final_states = FinalStateCapture(model.vlm)
        model.config.lora = {}  # no LoRA left; the trained settings go to merged_from
        _check_no_peft_left(model.vlm)
    model.cast_for_run(dtype, trainable_dtype=dtype)  # everything in dtype, as it is written
    # Written beside ``out`` and swapped in only when whole: a failure (a full disk) leaves no
    # half-written directory, and an --overwrite'd model is replaced only by a complete one.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, include_sam=True)
        _record_provenance(staging, directory, base_model or (config.vlm_path if config.adapter_path else None),
                           settings, to_apply, dtype)
        fsync_tree(staging)  # 16 GB that a power cut must not leave half-written under the final name
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote the standalone model to %s", out)
    return out


def _check_no_peft_left(vlm) -> None:
    leftovers = [name for name, _ in vlm.named_parameters() if "lora_" in name or "trainable_tokens" in name]
    leftovers += [name for name, _ in vlm.named_modules() if name.endswith("base_layer")]
    if leftovers:
        raise MergeError(f"the merge left peft modules behind (e.g. {leftovers[0]}); is peft up to date?")


def _record_provenance(out: Path, ckpt: Path, base_model, settings: dict, applied: dict, dtype: torch.dtype) -> None:
    """Note in config.json where the merged model came from (ignored when loading)."""
    file = out / CONFIG_NAME
    payload = json.loads(file.read_text(encoding="utf-8"))
    payload["merged_from"] = {
        "checkpoint": str(ckpt.resolve()),
        "base_model": str(base_model) if base_model else None,
        "lora": settings,
        "lora_overrides": applied,
        "dtype": str(dtype).removeprefix("torch."),
    }
    file.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
