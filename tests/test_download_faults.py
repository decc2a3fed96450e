"""Downloads that go wrong, against a real HTTP server: cut off half-way, always cut off, the wrong file, a killed run.

A cut-off download is retried (up to sources.DOWNLOAD_ATTEMPTS in all) and never used; a final
failure is one line saying what failed and what to set; nothing partial is left behind.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from chestxray.data import sources
from chestxray.data.sources import DataSourceError, download_drive
from chestxray.pipeline.ingest import ingest
from faulty_http import FaultyServer
from helpers import ROOT, data_params, make_subset, make_zip


@pytest.fixture(scope="module")
def archive(kermany224, tmp_path_factory) -> bytes:
    """A zip of 28 real X-rays laid out like Kaggle's download."""
    tmp = tmp_path_factory.mktemp("archive")
    return make_zip(make_subset(kermany224, tmp / "subset"), tmp / "chest_xray.zip").read_bytes()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Keep the waits between attempts short here (the real ones are 1 s, then 2 s)."""
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF_S", 0.05)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _artifacts(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "artifacts").iterdir())


def test_a_download_cut_off_once_is_retried_and_used_whole(archive, tmp_path):
    with FaultyServer(archive, cut=1) as server:
        report = ingest(data_params(server.url, checksum=_sha256(archive)), tmp_path / "artifacts" / "data")
    assert server.requests == 2
    assert sum(n for counts in report["counts"].values() for n in counts.values()) == 28  # every image arrived
    assert report["rejected"] == []
    assert _artifacts(tmp_path) == ["data"]


def test_a_download_always_cut_off_fails_clearly_after_three_attempts(archive, tmp_path):
    with FaultyServer(archive, cut=99) as server:
        with pytest.raises(DataSourceError) as error:
            ingest(data_params(server.url), tmp_path / "artifacts" / "data")
    message = str(error.value)
    assert server.requests == sources.DOWNLOAD_ATTEMPTS == 3
    assert f"could not download {server.url} after 3 attempts" in message, message
    assert f"of {len(archive):,} bytes" in message and "data.source" in message and "\n" not in message
    assert _artifacts(tmp_path) == []  # no partial file, nothing extracted, no output


def test_a_download_with_the_wrong_checksum_is_not_used(archive, tmp_path):
    with FaultyServer(archive) as server:
        with pytest.raises(DataSourceError) as error:
            ingest(data_params(server.url, checksum="sha256:" + "0" * 64), tmp_path / "artifacts" / "data")
    assert server.requests == 1  # the whole file arrived: asking again would bring the same bytes
    message = str(error.value)
    assert message.startswith(f"checksum mismatch for {server.url}") and "data.checksum" in message
    assert _sha256(archive) in message
    assert _artifacts(tmp_path) == []


def test_the_stage_reports_a_cut_download_in_one_line(archive, tmp_path):
    with FaultyServer(archive, cut=99) as server:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": data_params(server.url)}))
        result = subprocess.run([sys.executable, "-m", "chestxray.pipeline.ingest", "--params", "params.yaml",
                                 "--out", "artifacts/data"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not download {server.url} after 3 attempts"), lines
    assert _artifacts(tmp_path) == [".pipeline.lock"]


def _wait_for_part(folder: Path, run: subprocess.Popen, timeout_s: float = 60) -> Path:
    """The .part file a running download is writing (created once the response headers arrived)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and run.poll() is None:
        parts = list(folder.glob(".data.partial-*/fetch/download/*.part"))
        if parts:
            return parts[0]
        time.sleep(0.05)
    pytest.fail("the download never started writing its .part file")


def test_a_killed_download_leaves_work_that_the_next_run_removes(archive, tmp_path):
    out = tmp_path / "artifacts" / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with FaultyServer(archive, cut=1, stall=threading.Event()) as server:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": data_params(server.url)}))
        run = subprocess.Popen([sys.executable, "-m", "chestxray.pipeline.ingest", "--params", "params.yaml",
                                "--out", "artifacts/data"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        assert server.half_sent.wait(60)
        part = _wait_for_part(tmp_path / "artifacts", run)
        os.kill(run.pid, signal.SIGKILL)  # in the middle of the download
        run.wait()
        assert part.is_file() and part.parent.parent.parent.name.startswith(f".data.partial-{run.pid}-")

        report = ingest(data_params(server.url), out)  # the next run: the server now answers in full
    assert report["rejected"] == [] and (out / "manifest.csv").is_file()
    assert _artifacts(tmp_path) == [".pipeline.lock", "data"]


def test_drive_downloads_retry_and_check_the_checksum_too(archive, tmp_path):
    # gdown takes any URL; a Drive link only adds Google's confirmation page on top.
    with FaultyServer(archive, cut=1) as server:
        path = download_drive(server.url, tmp_path, checksum=_sha256(archive))
    assert path.read_bytes() == archive and server.requests == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive-download"]
    (tmp_path / "again").mkdir()
    with FaultyServer(archive) as server, pytest.raises(DataSourceError, match="checksum mismatch"):
        download_drive(server.url, tmp_path / "again", checksum="sha256:" + "0" * 64)
    assert list((tmp_path / "again").iterdir()) == []
