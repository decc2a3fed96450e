"""The ingest stage on real Kermany images: sources (folder, archives, HTTP), validation, patient split, duplicates."""
from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml
from helpers import CLASSES, ROOT, data_params, free_port, make_subset, make_zip
from PIL import Image

from chestxray.data.sources import DataSourceError, extract, find_dataset_root
from chestxray.data.split import patient_classes, patient_id, split_patients
from chestxray.data.validate import validate_file
from chestxray.pipeline.ingest import MANIFEST_COLUMNS, ingest


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def patients_by_split(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for row in rows:
        result.setdefault(row["split"], set()).add(row["patient"])
    return result


def assert_no_shared_patients(rows: list[dict[str, str]]) -> None:
    by_split = patients_by_split(rows)
    splits = sorted(by_split)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not by_split[a] & by_split[b], f"patients in both {a} and {b}"


def make_targz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname="chest_xray")
    return dest


@pytest.fixture
def subset(kermany224, tmp_path) -> Path:
    return make_subset(kermany224, tmp_path / "subset")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_stage(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    """The stage as DVC runs it: a subprocess with its own params file."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data_params(source)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "chestxray.pipeline.ingest", "--params", str(params),
                           "--out", str(tmp_path / "artifacts" / "data")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


# --- patient ids and the split ------------------------------------------------------------------

@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0173-0001-0002.jpeg", "IM-0173"),
    ("NORMAL2-IM-0095-0001.jpeg", "IM-0095"),
    ("train/NORMAL/IM-0001-0001.jpeg", "IM-0001"),
    ("scan_0042.png", "scan_0042"),
    ("personA_bacteria_1.jpeg", "personA_bacteria_1"),
])
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def test_patient_class_is_the_most_frequent_label():
    assert patient_classes(["a", "a", "a", "b"], ["X", "Y", "Y", "X"]) == {"a": "Y", "b": "X"}


def test_split_patients_is_seeded_and_stratified(kermany224):
    files = [(f.name, f.parent.name) for f in sorted((kermany224 / "train").glob("*/*.jpeg"))]
    classes = patient_classes([patient_id(n) for n, _ in files], [label for _, label in files])
    first = split_patients(classes, 0.1, seed=7)
    assert first == split_patients(classes, 0.1, seed=7)
    assert first != split_patients(classes, 0.1, seed=8)
    for label in CLASSES:
        members = [p for p, c in classes.items() if c == label]
        val = sum(first[p] == "val" for p in members)
        assert abs(val - 0.1 * len(members)) <= 1
    with_test = split_patients(classes, 0.1, seed=7, test_fraction=0.15)
    n_test = sum(s == "test" for s in with_test.values())
    n_val = sum(s == "val" for s in with_test.values())
    assert abs(n_test - 0.15 * len(classes)) <= 2
    assert abs(n_val - 0.1 * (len(classes) - n_test)) <= 2


# --- validation -------------------------------------------------------------------------------

def test_validate_file_reasons(kermany224, tmp_path):
    real = sorted((kermany224 / "train" / "NORMAL").glob("*.jpeg"))[0]
    assert validate_file(real, 128) == (True, "", 224, 224)
    cmyk = tmp_path / "cmyk.jpeg"
    Image.open(real).convert("CMYK").save(cmyk)
    ok, reason, _, _ = validate_file(cmyk, 128)
    assert not ok and "CMYK" in reason
    ok, reason, _, _ = validate_file(tmp_path / "missing.jpeg", 128)
    assert not ok and "cannot read" in reason


# --- the stage ----------------------------------------------------------------------------------

def test_folder_ingest_writes_images_manifest_and_report(subset, tmp_path):
    out = tmp_path / "out"
    report = ingest(data_params(subset), out)
    rows = read_manifest(out)

    assert list(rows[0]) == MANIFEST_COLUMNS
    assert rows == sorted(rows, key=lambda r: (r["split"], r["label"], r["path"]))
    assert report["classes"] == CLASSES
    assert report["rejected"] == [] and report["seed"] == 42 and report["source"] == str(subset)
    assert sum(n for counts in report["counts"].values() for n in counts.values()) == len(rows) == 28
    assert report["counts"]["test"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert all(report["counts"][s][c] > 0 for s in ("train", "val", "test") for c in CLASSES)
    for row in rows:
        data = (out / row["path"]).read_bytes()
        assert row["path"] == f"images/{row['split']}/{row['label']}/{Path(row['path']).name}"
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert (row["width"], row["height"]) == ("224", "224")
    assert report["dataset_sha256"] == hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    assert json.loads((out / "report.json").read_text()) == report
    assert_no_shared_patients(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "subset"]  # no work folder left behind

    again = ingest(data_params(subset), out)  # an existing output is replaced, with the same result
    assert again["dataset_sha256"] == report["dataset_sha256"]


@pytest.mark.parametrize("make", [make_zip, make_targz], ids=["zip", "tar.gz"])
def test_archive_ingest_matches_folder(subset, tmp_path, make):
    expected = ingest(data_params(subset), tmp_path / "from_folder")["dataset_sha256"]
    archive = make(subset, tmp_path / ("data.zip" if make is make_zip else "data.tar.gz"))
    checksum = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    report = ingest(data_params(archive, checksum=checksum), tmp_path / "from_archive")
    assert report["dataset_sha256"] == expected
    assert report["rejected"] == []  # the __MACOSX entries were skipped, not rejected


def test_extract_skips_macos_folders(subset, tmp_path):
    folder = extract(make_zip(subset, tmp_path / "data.zip"), tmp_path / "x", "data.zip")
    assert sorted(p.name for p in folder.iterdir()) == ["chest_xray"]
    assert find_dataset_root(folder, "data.zip") == folder / "chest_xray" / "chest_xray"


def test_http_archives(subset, tmp_path, http_dir):
    www, base = http_dir
    expected = ingest(data_params(subset), tmp_path / "from_folder")["dataset_sha256"]
    zipped = make_zip(subset, www / "chest_xray.zip")
    checksum = "sha256:" + hashlib.sha256(zipped.read_bytes()).hexdigest()
    report = ingest(data_params(f"{base}/chest_xray.zip", checksum=checksum), tmp_path / "zip")
    assert report["dataset_sha256"] == expected
    make_targz(subset, www / "download")  # no extension in the URL: the archive type comes from its bytes
    assert ingest(data_params(f"{base}/download?version=1"), tmp_path / "tgz")["dataset_sha256"] == expected

    with pytest.raises(DataSourceError, match="HTTP 404"):
        ingest(data_params(f"{base}/nothing.zip"), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


class _ShortBodyHandler(http.server.BaseHTTPRequestHandler):
    """Promises more bytes than it sends, like a connection dropped mid-download."""

    def do_GET(self) -> None:
        body = b"PK\x03\x04" + bytes(1000)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 5000))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_incomplete_download_is_an_error(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShortBodyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        with pytest.raises(DataSourceError, match="could not download|incomplete"):
            ingest(data_params(url), tmp_path / "artifacts" / "data")
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "artifacts").iterdir()) == []  # no partial download left behind


@pytest.mark.parametrize("make", [make_zip, make_targz], ids=["zip", "tar.gz"])
def test_damaged_archive_is_an_error(subset, tmp_path, make):
    archive = make(subset, tmp_path / "data.archive")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataSourceError, match="damaged archive"):
        ingest(data_params(archive), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checksum_mismatch_names_both_digests_and_writes_nothing(subset, tmp_path):
    archive = make_zip(subset, tmp_path / "data.zip")
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "artifacts" / "data"
    with pytest.raises(DataSourceError) as error:
        ingest(data_params(archive, checksum="sha256:" + "0" * 64), out)
    message = str(error.value)
    assert "0" * 64 in message and actual in message and "data.checksum" in message and "\n" not in message
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("member", ["../evil.jpeg", "/tmp/evil.jpeg"])
def test_archive_with_unsafe_path_is_refused(tmp_path, member):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo(member)
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(DataSourceError, match="unsafe"):
        ingest(data_params(archive), tmp_path / "out")
    assert not (tmp_path / "evil.jpeg").exists()


def test_bad_files_are_rejected_with_reasons(subset, tmp_path):
    normal = subset / "train" / "NORMAL"
    real = sorted(normal.glob("*.jpeg"))[0].read_bytes()
    (normal / "truncated.jpeg").write_bytes(real[: len(real) // 2])
    (normal / "notes.jpeg").write_text("radiologist notes, not an image\n")
    Image.open(io.BytesIO(real)).resize((64, 64)).save(normal / "tiny.jpeg")
    (subset / "train" / "stray.jpeg").write_bytes(real)  # outside any class folder

    out = tmp_path / "out"
    report = ingest(data_params(subset), out)
    reasons = {r["file"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"train/NORMAL/truncated.jpeg", "train/NORMAL/notes.jpeg", "train/NORMAL/tiny.jpeg",
                            "train/stray.jpeg"}
    assert "truncated" in reasons["train/NORMAL/truncated.jpeg"]
    assert "not a JPEG" in reasons["train/NORMAL/notes.jpeg"]
    assert "too small (64x64" in reasons["train/NORMAL/tiny.jpeg"]
    assert "class folder" in reasons["train/stray.jpeg"]
    names = {Path(r["path"]).name for r in read_manifest(out)}
    assert not names & {"truncated.jpeg", "notes.jpeg", "tiny.jpeg", "stray.jpeg"} and len(names) == 28


def test_duplicates_within_and_across_splits(subset, tmp_path):
    normal = subset / "train" / "NORMAL"
    original = sorted(normal.glob("IM-*.jpeg"))[0]  # e.g. IM-0115-0001.jpeg
    same_patient_copy = normal / original.name.replace("-0001.jpeg", "-0099.jpeg")
    shutil.copy(original, same_patient_copy)  # same patient, so same split: a within-split duplicate
    test_image = sorted((subset / "test" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy(test_image, normal / "IM-9999-0001.jpeg")  # a test image again in train, under another patient

    out = tmp_path / "out"
    report = ingest(data_params(subset), out)
    within, across = report["duplicates"]["within_split"], report["duplicates"]["across_splits"]
    assert [(d["file"], d["duplicate_of"]) for d in within] == [
        (f"train/NORMAL/{same_patient_copy.name}", f"train/NORMAL/{original.name}")]
    assert [(d["file"], d["duplicate_of"], d["duplicate_split"]) for d in across] == [
        ("train/NORMAL/IM-9999-0001.jpeg", f"test/NORMAL/{test_image.name}", "test")]
    rows = read_manifest(out)
    names = [Path(r["path"]).name for r in rows]
    assert same_patient_copy.name not in names and "IM-9999-0001.jpeg" not in names
    assert test_image.name in names and original.name in names
    assert len({r["sha256"] for r in rows}) == len(rows)


def test_patient_overlap_with_test(kermany224, tmp_path):
    # IM-0117 is a real patient with images in both the official train and test splits.
    subset = make_subset(kermany224, tmp_path / "subset")
    shutil.copy(kermany224 / "train/NORMAL/IM-0117-0001.jpeg", subset / "train/NORMAL")
    shutil.copy(kermany224 / "test/NORMAL/NORMAL2-IM-0117-0001.jpeg", subset / "test/NORMAL")

    dropped = ingest(data_params(subset), tmp_path / "drop")
    assert dropped["patient_overlap"] == {"policy": "drop", "patients": 1, "images_dropped": 1}
    rows = read_manifest(tmp_path / "drop")
    assert [r["split"] for r in rows if r["patient"] == "IM-0117"] == ["test"]
    assert_no_shared_patients(rows)

    kept = ingest(data_params(subset, patient_overlap="keep"), tmp_path / "keep")
    assert kept["patient_overlap"] == {"policy": "keep", "patients": 1, "images_dropped": 0}
    assert len(read_manifest(tmp_path / "keep")) == len(rows) + 1


def test_class_folders_without_test_split(kermany224, tmp_path):
    source = tmp_path / "wrapper" / "xrays"
    for label in CLASSES:
        (source / label).mkdir(parents=True)
        for f in sorted((kermany224 / "train" / label).glob("*.jpeg"))[:20]:
            shutil.copy(f, source / label)
    report = ingest(data_params(tmp_path / "wrapper", test_fraction=0.25), tmp_path / "out")
    rows = read_manifest(tmp_path / "out")
    assert all(report["counts"][s][c] > 0 for s in ("train", "val", "test") for c in CLASSES)
    assert len(rows) == 40
    assert_no_shared_patients(rows)


@pytest.mark.slow  # all 5,856 images (the stage's time is measured by the pipeline run, not here)
def test_full_kermany224(kermany224, tmp_path):
    source_files = sorted(kermany224.glob("*/*/*.jpeg"))
    report = ingest(data_params(kermany224), tmp_path / "data")
    rows = read_manifest(tmp_path / "data")

    dropped = (len(report["rejected"]) + report["patient_overlap"]["images_dropped"]
               + sum(d["action"] == "dropped" for v in report["duplicates"].values() for d in v))
    assert len(rows) == len(source_files) - dropped
    # The official test split is the published benchmark: every one of its files stays.
    assert sum(r["split"] == "test" for r in rows) == len(list(kermany224.glob("test/*/*.jpeg")))
    assert sum(n for counts in report["counts"].values() for n in counts.values()) == len(rows)
    assert report["patient_overlap"]["patients"] > 0
    assert_no_shared_patients(rows)
    by_split = patients_by_split(rows)
    assert 0.08 < len(by_split["val"]) / (len(by_split["train"]) + len(by_split["val"])) < 0.12
    assert all(report["counts"][s][c] > 0 for s in ("train", "val", "test") for c in CLASSES)
    test_sources = {f.name for f in kermany224.glob("test/*/*.jpeg")}
    assert {Path(r["path"]).name for r in rows if r["split"] == "test"} <= test_sources


# --- failures: one line on stderr, exit 1 ----------------------------------------------------------

@pytest.mark.parametrize("source, words", [
    ("http://127.0.0.1:{port}/x.zip", "could not download"),
    ("missing-folder", "not found"),
])
def test_stage_fails_with_one_line(tmp_path, source, words):
    result = run_stage(tmp_path, source.format(port=free_port()))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0] and "data.source" in lines[0]
    assert not (tmp_path / "artifacts" / "data").exists()


def test_stage_prints_a_summary(subset, tmp_path):
    result = run_stage(tmp_path, str(subset))
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "NORMAL" in result.stdout and "rejected 0" in result.stdout
    assert (tmp_path / "artifacts" / "data" / "manifest.csv").is_file()
