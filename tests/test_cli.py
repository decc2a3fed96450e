"""`chestxray predict` on the 16 real full-size X-rays plus a corrupt file."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from chestxray.cli import main
from chestxray.model.predictor import Predictor

COLUMNS = ["file", "predicted_class", "confidence", "p_NORMAL", "p_PNEUMONIA", "low_confidence", "warnings",
           "warning_messages", "ood_distance", "xray_score", "error"]


@pytest.fixture(scope="module")
def inputs(fullsize_dir, tmp_path_factory) -> Path:
    """The 16 real X-rays in their class folders, plus a corrupt JPEG and a text file that is skipped."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(fullsize_dir, root / "xrays")
    (root / "xrays" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "xrays" / "notes.txt").write_text("not an image, wrong suffix: never read")
    return root / "xrays"


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_predict_folder_with_heatmaps(inputs, tiny_artifacts, tmp_path, capsys):
    out, heatmaps = tmp_path / "results.csv", tmp_path / "heatmaps"
    code = main(["predict", str(inputs), "--out", str(out), "--heatmaps", str(heatmaps),
                 "--artifacts", str(tiny_artifacts), "--batch-size", "5"])
    assert code == 0
    columns, rows = read_rows(out)
    assert columns == COLUMNS
    assert len(rows) == 17
    broken = [r for r in rows if r["error"]]
    assert [Path(r["file"]).name for r in broken] == ["broken.jpg"]
    assert "truncated" in broken[0]["error"] and broken[0]["predicted_class"] == ""
    good = [r for r in rows if not r["error"]]
    for row in good:
        assert row["predicted_class"] in ("NORMAL", "PNEUMONIA")
        assert float(row["p_NORMAL"]) + float(row["p_PNEUMONIA"]) == pytest.approx(1.0, abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(float(row[f"p_{row['predicted_class']}"]))
        assert row["low_confidence"] in ("True", "False")
        # Each warning code is followed by its words: "code: words; code: words".
        codes = [part.split(": ", 1)[0] for part in row["warning_messages"].split("; ") if part]
        assert codes == [c for c in row["warnings"].split(";") if c]
        assert (row["low_confidence"] == "True") == ("low_confidence: The model is unsure" in row["warning_messages"])

    pngs = sorted(heatmaps.glob("*.png"))
    assert len(pngs) == 16
    first = inputs / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg"
    overlay = cv2.imread(str(heatmaps / "NORMAL__NORMAL2-IM-1427-0001.gradcam.png"))
    assert overlay.shape[:2] == cv2.imread(str(first), cv2.IMREAD_GRAYSCALE).shape

    # The CLI's numbers are the Predictor's.
    clf = Predictor.from_artifacts(tiny_artifacts)
    expected = clf.predict_bytes(first.read_bytes())
    row = next(r for r in good if r["file"] == str(first))
    assert row["predicted_class"] == expected.predicted_class
    assert float(row["p_PNEUMONIA"]) == pytest.approx(expected.probabilities["PNEUMONIA"], abs=1e-4)
    assert "16 predicted, 1 unreadable" in capsys.readouterr().err


def test_predict_with_tta_matches_the_classifier_with_tta(inputs, varying_exported, tmp_path):
    files = sorted((inputs / "NORMAL").glob("*.jpeg"))[:2]
    rows = {}
    for tta in (False, True):
        out = tmp_path / f"tta_{tta}.csv"
        assert main(["predict", *map(str, files), "--out", str(out), "--artifacts", str(varying_exported),
                     *(["--tta"] if tta else [])]) == 0
        rows[tta] = read_rows(out)[1]
    clf = Predictor.from_artifacts(varying_exported, tta=True)
    for path, row, plain in zip(files, rows[True], rows[False], strict=True):
        expected = clf.predict_bytes(path.read_bytes()).probabilities["PNEUMONIA"]
        assert float(row["p_PNEUMONIA"]) == pytest.approx(expected, abs=1e-5)
        assert float(row["p_PNEUMONIA"]) != pytest.approx(float(plain["p_PNEUMONIA"]), abs=1e-4)


def test_predict_single_files(inputs, tiny_artifacts, tmp_path):
    out = tmp_path / "two.csv"
    files = [inputs / "PNEUMONIA" / "person1946_bacteria_4874.jpeg", inputs / "broken.jpg"]
    assert main(["predict", *map(str, files), "--out", str(out), "--artifacts", str(tiny_artifacts)]) == 0
    _, rows = read_rows(out)
    assert [r["file"] for r in rows] == list(map(str, files))
    assert rows[0]["predicted_class"] and not rows[0]["error"] and rows[1]["error"]


def test_missing_model_is_one_line_exit_1(inputs, tmp_path, capsys):
    code = main(["predict", str(inputs), "--out", str(tmp_path / "x.csv"), "--artifacts", str(tmp_path / "none")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trained model" in err


def test_console_script_help():
    exe = Path(sys.executable).with_name("chestxray")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "chestxray.cli"]
    result = subprocess.run([*command, "predict", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--out", "--heatmaps", "--artifacts", "--batch-size"):
        assert option in result.stdout
