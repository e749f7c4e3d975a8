"""Training checkpoints: written atomically, the last K kept plus the best.

A checkpoint is a directory ``checkpoint-0000123`` in the run directory holding the trainable
weights as a segmenter directory (``ReasonSegmenter.save_pretrained(include_sam=False)``:
config.json, adapter/, head.safetensors), plus ``optimizer.pt``, ``scheduler.pt``,
``rng_state_rank{R}.pt``, ``loss_scaler.pt`` (fp16 runs) and, written last, ``trainer_state.json``.
Everything is first written to a hidden temporary directory that is renamed into place only when
complete, so a crash mid-write never leaves a checkpoint that looks complete. ``latest`` and
``best`` are small text files naming a checkpoint, replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    """Write ``trainer_state.json`` last, rename the temporary directory into place, update ``latest``."""
    run_dir = Path(run_dir)
    tmp = temporary_path(run_dir, step)
    final = run_dir / checkpoint_name(step)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomically(run_dir / LATEST_FILE, final.name + "\n")
    return final


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and directory.name.startswith(PREFIX) and (directory / STATE_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if is_complete(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_state(checkpoint: Path) -> dict:
    file = Path(checkpoint) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads(file.read_text(encoding="utf-8"))


def mark_best(run_dir: Path, checkpoint: Path) -> None:
    _write_text_atomically(Path(run_dir) / BEST_FILE, Path(checkpoint).name + "\n")


def best_checkpoint(run_dir: Path) -> Path | None:
    file = Path(run_dir) / BEST_FILE
    if not file.is_file():
        return None
    path = Path(run_dir) / file.read_text(encoding="utf-8").strip()
    return path if is_complete(path) else None


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the last ``keep_last`` complete checkpoints, always keeping the best."""
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
