"""One pipeline run at a time: a second run is refused in one line, a finished or killed run never blocks.

Real processes throughout: the lock holder, `python main.py`, a stage, and real `dvc` commands.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"),
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
HOLD = ("import sys\n"
        "from chestxray.pipeline.lock import {what}\n"
        "with {what}():\n"
        "    print('holding', flush=True)\n"
        "    sys.stdin.readline()\n")


@contextmanager
def holding(cwd: Path, what: str = "pipeline_lock") -> Iterator[subprocess.Popen]:
    """A separate process holding the lock (`pipeline_lock`, or `whole_run_lock` as `python main.py` does)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(what=what)], cwd=cwd, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "holding\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(30)


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def main_py(cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(ROOT / "main.py")], cwd)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_second_run_is_refused_in_one_line_and_runs_once_the_first_is_done(tmp_path):
    with holding(tmp_path) as first:
        line = one_error_line(main_py(tmp_path))
        assert line == (f"error: another pipeline run (pid {first.pid}) is in progress: wait for it to finish, "
                        f"or stop it (kill {first.pid}) and run again")
        stage = run([sys.executable, "-m", "chestxray.pipeline.prepare_base_model"], tmp_path)
        assert one_error_line(stage) == line  # a stage run by hand is refused alike
        assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [".pipeline.lock"]  # nothing written
    # The first run is over: the next one gets past the lock (and stops at the first thing it really lacks).
    assert "params.yaml not found" in one_error_line(main_py(tmp_path))


def test_the_lock_file_of_a_killed_run_does_not_block(tmp_path):
    victim = subprocess.Popen([sys.executable, "-c", HOLD.format(what="pipeline_lock")], cwd=tmp_path, env=ENV,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert victim.stdout.readline() == "holding\n"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    lock_file = tmp_path / "artifacts" / ".pipeline.lock"
    assert lock_file.read_text().strip() == str(victim.pid)  # the file outlives its process; the flock does not
    assert "params.yaml not found" in one_error_line(main_py(tmp_path))


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A real git+DVC repository whose one stage writes artifacts/data."""
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=ENV, check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: python -c \"import os, time; os.makedirs('artifacts/data', exist_ok=True); "
        "print('started', flush=True); time.sleep(float(os.environ.get('STAGE_SLEEP', 0)))\"\n"
        "    outs:\n      - artifacts/data\n")
    return tmp_path


def test_dvc_repro_is_refused_while_main_py_runs_and_deletes_nothing(dvc_repo):
    # DVC deletes a stage's outputs before running it; it must stop before that.
    (dvc_repo / "artifacts" / "data").mkdir(parents=True)
    (dvc_repo / "artifacts" / "data" / "manifest.csv").write_text("written by the running python main.py\n")
    with holding(dvc_repo, "whole_run_lock"):
        result = run(["dvc", "repro"], dvc_repo)
    assert result.returncode != 0 and "Unable to acquire lock" in result.stderr, result.stderr
    assert "Running stage" not in result.stdout
    assert (dvc_repo / "artifacts" / "data" / "manifest.csv").is_file()


DVC_BUSY = ("error: a DVC command (pid {pid}, e.g. `dvc repro`) is running in this repository: wait for it to "
            "finish, or stop it (kill {pid}) and run again")


def test_main_py_is_refused_while_dvc_holds_its_repository_lock(dvc_repo):
    # `dvc repro` holds it between stages (and any other DVC command while it works): DVC's own lock class.
    hold = "import sys\nfrom dvc.lock import Lock\nwith Lock('.dvc/tmp/lock'):\n    print('holding', flush=True)\n" \
           "    sys.stdin.readline()\n"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=dvc_repo, env=ENV, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert one_error_line(main_py(dvc_repo)) == DVC_BUSY.format(pid=holder.pid)
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_main_py_is_refused_while_dvc_repro_runs_a_stage(dvc_repo):
    # While a stage's command runs, DVC lets go of its repository lock and records the stage in .dvc/tmp/rwlock.
    repro = subprocess.Popen(["dvc", "repro"], cwd=dvc_repo, env={**ENV, "STAGE_SLEEP": "60"}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line in repro.stdout:
            if line.startswith("started"):
                break
        assert one_error_line(main_py(dvc_repo)) == DVC_BUSY.format(pid=repro.pid)
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait()
