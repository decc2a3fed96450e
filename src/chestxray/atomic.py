"""Writing files so that an interrupted run never leaves a half-written one, and clearing what it left.

A stage writes each file a later stage or the app reads through `atomic_path`: the bytes go to a
temporary file beside the target, are flushed to disk, and only then take the target's name
(os.replace is atomic on one filesystem). A reader sees the old file or the new one, never a part.

Temporary names carry the writer's process id, so the leftovers of a killed run are recognised
(`remove_dead_leftovers`) and removed by the next run, while a live run's are left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_TEMP_MARK = ".partial-"  # in every temporary name: <prefix>.partial-<pid>-<random>[suffix]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def leftover_name(prefix: str, suffix: str = "") -> str:
    """A unique name for work in progress of this process: `<prefix>.partial-<pid>-<random><suffix>`."""
    return f"{prefix}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def remove_dead_leftovers(folder: Path, prefix: str) -> list[Path]:
    """Remove `leftover_name(prefix, ...)` files and folders in `folder` whose process is gone; return them."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"{prefix}{_TEMP_MARK}*"):
        pid = path.name[len(prefix) + len(_TEMP_MARK):].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path` in one step.

    The temporary name keeps the target's suffix (Keras insists on `.keras`, `.weights.h5`). If the
    body raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}"
    remove_dead_leftovers(path.parent, prefix)
    temp = path.with_name(leftover_name(prefix, "".join(path.suffixes[-2:])))
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")
