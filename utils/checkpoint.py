"""Training checkpoints: written atomically, the last K kept plus the best.

A checkpoint is a directory ``checkpoint-0000123`` in the run directory holding the trainable
weights as a segmenter directory (``ReasonSegmenter.save_pretrained(include_sam=False)``:
config.json, adapter/, head.safetensors), plus ``optimizer.pt``, ``scheduler.pt``,
``rng_state_rank{R}.pt``, ``loss_scaler.pt`` (fp16 runs) and, written last, ``trainer_state.json``.
Everything is first written to a hidden temporary directory that is flushed to disk (``fsync``) and
renamed into place only when complete, so neither a crash nor a power cut mid-write leaves a
checkpoint that looks complete. ``latest`` and
``best`` are small text files naming a checkpoint, replaced atomically; ``latest`` is where a run
continues.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from utils.atomic_files import fsync_path, fsync_tree, move_into_place, write_text_atomically

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def temporary_path(run_dir: Path, step: int) -> Path:
    """The hidden directory a checkpoint is written into before it is renamed into place."""
    return Path(run_dir) / f".{checkpoint_name(step)}.tmp"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create (afresh) the temporary directory of the checkpoint of ``step`` and return it."""
    tmp = temporary_path(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(run_dir: Path, step: int, state: dict) -> Path:
    """Write ``trainer_state.json`` last, flush it all to disk, rename the temporary directory into
    place, update ``latest``."""
    run_dir = Path(run_dir)
    tmp = temporary_path(run_dir, step)
    final = run_dir / checkpoint_name(step)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    # A checkpoint of this step from before (a run resumed from an earlier one) is replaced, not
    # deleted first: a crash in between loses neither.
    move_into_place(tmp, final)
    fsync_path(run_dir)
    write_text_atomically(run_dir / LATEST_FILE, final.name + "\n", durable=True)
    return final


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint (``checkpoint-<step>``) whose last file is written."""
    name = directory.name
    return (
        directory.is_dir() and name.startswith(PREFIX) and name[len(PREFIX):].isdigit()
        and (directory / STATE_FILE).is_file()
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step: ``checkpoint-10`` after ``checkpoint-9``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    return int(Path(checkpoint).name[len(PREFIX):])


def named_checkpoint(run_dir: Path, pointer: str) -> Path | None:
    """The directory the entry ``pointer`` (``latest``, ``best``) of ``run_dir`` names, complete
    or not: a file holding its name (as this module writes them), or a link to it. None without
    such an entry."""
    entry = Path(run_dir) / pointer
    if entry.is_dir():  # a link or a copy, made by hand (this module writes files)
        return entry.resolve()
    if not entry.is_file():
        return None
    name = entry.read_text(encoding="utf-8").strip()
    return Path(run_dir) / name if name else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names (the last one written) if complete, else the highest complete one.

    Not simply the highest: a run resumed from an earlier checkpoint leaves the higher ones of the
    abandoned run in place until its first save (see :func:`rotate_checkpoints`).
    """
    named = named_checkpoint(run_dir, LATEST_FILE)
    if named is not None and is_complete(named):
        return named
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_state(checkpoint: Path) -> dict:
    file = Path(checkpoint) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads(file.read_text(encoding="utf-8"))


def mark_best(run_dir: Path, checkpoint: Path) -> None:
    write_text_atomically(Path(run_dir) / BEST_FILE, Path(checkpoint).name + "\n", durable=True)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``best`` names, if complete."""
    named = named_checkpoint(run_dir, BEST_FILE)
    return named if named is not None and is_complete(named) else None


def rotate_checkpoints(run_dir: Path, keep_last: int, current: Path) -> None:
    """After ``current`` is written: set aside the checkpoints of later steps, then delete all but
    the last ``keep_last`` (0: keep all), always keeping the best.

    Later steps are those of a run that went further before this one resumed from an earlier
    checkpoint. They are moved, with ``best`` if it names one of them, into ``abandoned-<time>/``
    (not deleted: the abandoned run's best may be among them), where nothing resumes from them,
    rotation leaves them alone and this run does not overwrite them.
    """
    run_dir = Path(run_dir)
    later = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > checkpoint_step(current)]
    if later:
        aside = run_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        if best_checkpoint(run_dir) in later:
            os.replace(run_dir / BEST_FILE, aside / BEST_FILE)
        for checkpoint in later:
            os.rename(checkpoint, aside / checkpoint.name)
        logger.warning(
            "moved %s, written before this run resumed from an earlier step, to %s (delete it when not needed)",
            ", ".join(p.name for p in later), aside,
        )
    if keep_last <= 0:
        return
    best = best_checkpoint(run_dir)
    checkpoints = list_checkpoints(run_dir)
    for old in checkpoints[:-keep_last]:
        if best is not None and old.resolve() == best.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed old checkpoint %s", old)


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    """Optimizer, scheduler and RNG states: plain tensors and containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)
