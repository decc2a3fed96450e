"""A source's locations are tried in order, as on a user's own machine: the local copy when it is there, else
the public archive, downloaded from a real HTTP server on 127.0.0.1 (once, then from the download cache);
with nothing reachable, one error names every place tried and what to do.
"""
from __future__ import annotations

import json

import pytest

from chestxray.data.sources import DataSourceError
from chestxray.pipeline.ingest import ingest
from faulty_http import FaultyServer
from helpers import data_params, free_port, make_subset, make_zip


@pytest.fixture(scope="module")
def local_copy(kermany224, tmp_path_factory):
    """28 real X-rays laid out like the dataset (train/ and test/ class folders), and the same as a zip archive."""
    tmp = tmp_path_factory.mktemp("sources")
    folder = make_subset(kermany224, tmp / "kermany")
    return folder, make_zip(folder, tmp / "chest_xray.zip").read_bytes()


def _params(locations: list[str], cache) -> dict:
    return {**data_params(None), "source": None, "sources": [{"name": "kermany", "location": locations}],
            "download_cache": str(cache)}


def _used(report: dict) -> tuple[str, list[str]]:
    [source] = report["sources"]
    return source["used"], [failed["location"] for failed in source["failed"]]


def _images(report: dict) -> int:
    return sum(sum(per_class.values()) for per_class in report["counts"].values())


def test_the_local_copy_is_used_when_it_is_there(local_copy, tmp_path):
    folder, archive = local_copy
    with FaultyServer(archive) as server:
        report = ingest(_params([str(folder), server.url], tmp_path / "cache"), tmp_path / "data")
    assert _used(report) == (str(folder), [])
    assert server.requests == 0  # nothing downloaded
    assert _images(report) == 28


def test_without_the_local_copy_the_archive_is_downloaded_once_then_cached(local_copy, tmp_path):
    folder, archive = local_copy
    missing = str(tmp_path / "not-here")
    with FaultyServer(archive) as server:
        first = ingest(_params([missing, server.url], tmp_path / "cache"), tmp_path / "first")
        assert _used(first) == (server.url, [missing])
        assert server.requests == 1
        second = ingest(_params([missing, server.url], tmp_path / "cache"), tmp_path / "second")
        assert server.requests == 1  # the second run took the cached archive
    local = ingest(_params([str(folder)], tmp_path / "cache"), tmp_path / "local")
    # The same 28 images whichever way they came.
    assert _images(first) == _images(second) == _images(local) == 28
    assert first["dataset_sha256"] == second["dataset_sha256"] == local["dataset_sha256"]
    assert json.loads((tmp_path / "first" / "report.json").read_text())["sources"][0]["used"] == server.url


def test_offline_with_nothing_local_the_error_names_every_place_tried(tmp_path):
    missing, unreachable = str(tmp_path / "not-here"), f"http://127.0.0.1:{free_port()}/chest_xray.zip"
    with pytest.raises(DataSourceError) as error:
        ingest(_params([missing, unreachable], tmp_path / "cache"), tmp_path / "data")
    message = str(error.value)
    assert "source kermany: none of its 2 locations worked" in message
    assert missing in message and unreachable in message
    assert f"put the dataset at {missing}" in message and "connect to the internet" in message
    assert not (tmp_path / "data").exists()  # nothing half-written
