"""Schemathesis against /openapi.json of the app under gunicorn, with API keys and in open mode: generated
requests, every check but one.

Positive and negative data for every operation, bounded in examples; the checks include
not_a_server_error (no 5xx), status codes, content types, headers and response bodies as the
document describes them (in open mode the document asks for no key and promises no 401; with keys it
does, and ignored_auth checks that a request without one is refused). positive_data_acceptance is off: JSON Schema cannot say "an X-ray of
128-4096 px a side", so a schema-valid 1x1 PNG is rightly refused (422). 413 counts as a correct
refusal of bad data (tests/schemathesis.toml).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import USER_KEY, free_port

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def open_server(tiny_artifacts, tmp_path_factory):
    """The tiny model under gunicorn in open mode: no API keys configured (admin endpoints answer 403)."""
    sys.path.insert(0, str(HERE.parent / "bench"))
    from inference import Server

    path = os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])
    env = {"CHESTXRAY_API_KEYS": "", "PYTHONPATH": path}
    server = Server(tiny_artifacts, free_port(), "keras", env=env, log=tmp_path_factory.mktemp("open") / "server.log")
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["with API keys", "open mode"])
def test_schemathesis_finds_no_failures(mode, request, tmp_path):
    server = request.getfixturevalue("gunicorn_server" if mode == "with API keys" else "open_server")
    key = ["--header", f"X-API-Key: {USER_KEY}"] if mode == "with API keys" else []
    st = Path(sys.executable).with_name("st")
    command = [str(st), "--config-file", str(HERE / "schemathesis.toml"), "run", f"{server.url}/openapi.json", *key,
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--max-examples", "30", "--seed", "1", "--workers", "1",
               "--request-timeout", "60", "--no-shrink", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    summary = result.stdout[-6000:]
    print(summary)
    assert result.returncode == 0, summary
    import re

    selected, total = map(int, re.search(r"(\d+) selected / (\d+) total", result.stdout).groups())
    assert selected == total >= 9  # every operation was tested (9 of them at the time of writing)
