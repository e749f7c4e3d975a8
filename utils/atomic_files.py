"""Files and directories that appear whole or not at all.

A reader (a resumed run, ``test.py --resume``, another tool) never sees a half-written file: each
is written beside its destination under a hidden name and renamed into place, which POSIX makes
atomic within one file system. ``durable=True`` also flushes the data to disk before the rename,
so that a power cut cannot leave a complete-looking name over empty or truncated contents.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file, or a directory's entries, to disk (directories where the OS allows it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file below ``directory``, then the directories themselves, deepest first."""
    directories = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        directories.append(Path(root))
    for path in reversed(directories):
        fsync_path(path)


def write_text_atomically(path: str | os.PathLike, text: str | Iterable[str], durable: bool = False) -> Path:
    """Write ``text`` (UTF-8; a string, or pieces written one after another, so that a large file
    is never whole in memory) to ``path`` through a hidden temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines([text] if isinstance(text, str) else text)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a failing generator, Ctrl-C: no hidden half-file stays
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path


def move_into_place(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the complete directory ``staging`` to ``final``, replacing what is there.

    An existing ``final`` is set aside (not deleted) until the new one is in place, so that a
    crash in between loses neither; both must be on one file system.
    """
    staging, final = Path(staging), Path(final)
    if final.exists():
        replaced = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staging, final)
        shutil.rmtree(replaced)
    else:
        os.rename(staging, final)
    return final
