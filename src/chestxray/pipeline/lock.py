"""One pipeline run at a time: an exclusive lock on artifacts/.pipeline.lock.

Every stage takes it (`run_stage`, on the lock file of the folder its output goes into: with the
default paths, artifacts/), and `python main.py` takes it for the whole run, so a second run
started meanwhile stops at once with one line naming the running one instead of writing over its
artifacts. The lock is a kernel flock: it goes away with the process that held it, so a run
that was killed never blocks the next one (the file stays; its content is only a hint).

`python main.py` also takes DVC's own repository lock (.dvc/tmp/lock, the flock `dvc repro` holds
except while a stage's command runs): DVC deletes a stage's outputs before running it, so a
`dvc repro` started during `python main.py` must be refused by DVC before it touches anything, and
`python main.py` must not start while a `dvc repro` is between two stages or inside one.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from chestxray.atomic import pid_alive

LOCK_NAME = ".pipeline.lock"
LOCK_FILE = Path("artifacts") / LOCK_NAME
DVC_DIR = Path(".dvc")  # DVC's repository lock is .dvc/tmp/lock

_held: set[Path] = set()  # locks this process holds: a stage run inside `python main.py` takes them again


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the lock; the message says which and what to do."""


def _holder(path: Path) -> str:
    """The pid written in a lock file, as text ('?' if unreadable)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


@contextmanager
def _flock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing), writing our pid into it; `busy` formats the refusal."""
    path = path.resolve()
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusy(busy.format(pid=_holder(path))) from None
        # The format DVC's lock library (zc.lockfile) writes, so both read each other's holder.
        os.ftruncate(fd, 0)
        os.write(fd, f" {os.getpid()}\n".encode())
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
    finally:
        os.close(fd)  # releases the flock


def lock_file_for(out: Path) -> Path:
    """The lock guarding a stage output: in the folder that holds it (artifacts/training -> artifacts/.pipeline.lock)."""
    return Path(out).parent / LOCK_NAME


@contextmanager
def pipeline_lock(lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the pipeline lock; raises PipelineBusy at once if another run holds it."""
    with _flock(lock_file, "another pipeline run (pid {pid}) is in progress: wait for it to finish, "
                           "or stop it (kill {pid}) and run again"):
        yield


def _dvc_stage_running(dvc_tmp: Path) -> int | None:
    """The pid of a live DVC process that holds stage outputs in .dvc/tmp/rwlock (DVC lets go of its
    repository lock while a stage's command runs, and keeps this record instead), or None."""
    try:
        record = json.loads((dvc_tmp / "rwlock").read_text())
        holders = [*record.get("write", {}).values(), *(i for infos in record.get("read", {}).values() for i in infos)]
        pids = [int(info["pid"]) for info in holders]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # none, or not DVC's format: no evidence
        return None
    return next((pid for pid in pids if pid_alive(pid)), None)


@contextmanager
def whole_run_lock(lock_file: Path = LOCK_FILE, dvc_dir: Path = DVC_DIR) -> Iterator[None]:
    """For `python main.py`: the pipeline lock, and in a DVC repository DVC's repository lock too,
    refusing while a `dvc repro` runs (between stages it holds that lock; during one, its rwlock record)."""
    busy = ("a DVC command (pid {pid}, e.g. `dvc repro`) is running in this repository: wait for it to finish, "
            "or stop it (kill {pid}) and run again")
    with ExitStack() as stack:
        stack.enter_context(pipeline_lock(lock_file))
        if dvc_dir.is_dir():
            stack.enter_context(_flock(dvc_dir / "tmp" / "lock", busy))
            pid = _dvc_stage_running(dvc_dir / "tmp")
            if pid is not None:
                raise PipelineBusy(busy.format(pid=pid))
        yield
