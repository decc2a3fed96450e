"""Atomic writes: an interrupted write never leaves a half-written file, and its leftovers are cleared."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from chestxray.atomic import atomic_path, leftover_name, remove_dead_leftovers, write_json
from helpers import ROOT


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    write_json(target, {"accuracy": 0.9})
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_write_interrupted_by_an_exception_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"the old, complete model")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temp:
            assert temp.parent == tmp_path and temp.name.endswith(".keras")  # Keras insists on the suffix
            temp.write_bytes(b"half a new mo")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"the old, complete model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_a_killed_writer_leaves_the_old_file_and_the_next_write_clears_its_leftover(tmp_path):
    target = tmp_path / "thresholds.json"
    write_json(target, {"decision_threshold": 0.4})
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from chestxray.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as temp:\n"
        "    f = open(temp, 'w'); f.write('{\"decision_thr'); f.flush()\n"
        "    print('writing', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert json.loads(target.read_text()) == {"decision_threshold": 0.4}  # readers never see the half
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and str(writer.pid) in leftovers[0].name

    write_json(target, {"decision_threshold": 0.6})
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]


def test_only_leftovers_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".data.partial-{pid}-abcd1234").mkdir()
        (tmp_path / f".data.partial-{pid}-abcd1234" / "x").write_text("work")
    (tmp_path / "data").mkdir()
    removed = remove_dead_leftovers(tmp_path, ".data")
    assert [p.name for p in removed] == [f".data.partial-{dead}-abcd1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", f".data.partial-{alive}-abcd1234"])
    assert leftover_name(".data").startswith(f".data.partial-{os.getpid()}-")
