"""ONNX export and the two inference backends: the export check, ONNX vs Keras, the app and CLI on each backend."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import copy_model as _copy_model
from helpers import real_test_data as _data_dir
from helpers import png_bytes, upload, write_manifest

from chestxray.model.artifacts import ONNX_FILE, ModelFiles, ModelNotFound
from chestxray.model.network import choose_backend
from chestxray.model.predictor import Predictor
from chestxray.model.onnx_export import FEATURE_TOLERANCE, META_KERAS_SHA256, TOLERANCE, OnnxModelError, OnnxRunner
from chestxray.pipeline import export as export_stage
from chestxray.serving import create_app

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def exported(tiny_exported) -> Path:
    return tiny_exported


@pytest.fixture(scope="module")
def originals(fullsize_dir) -> list[Path]:
    return sorted(fullsize_dir.glob("*/*.jpeg"))


# --- the export stage -----------------------------------------------------------------------------

def test_export_writes_onnx_and_a_passing_check(exported):
    check = json.loads((exported / "export" / "check.json").read_text())
    assert check["passed"] is True
    assert check["n_images"] == 12 and check["mismatched"] == []
    assert 0.0 <= check["max_abs_diff"] <= TOLERANCE
    assert 0.0 <= check["features_max_rel_diff"] <= FEATURE_TOLERANCE  # the second output is checked too
    assert (exported / "export" / ONNX_FILE).stat().st_size > 100_000
    assert not list((exported / "export").glob("*partial*"))  # no temporary file left
    runner = OnnxRunner.load(exported / "export" / ONNX_FILE)
    assert (runner.output_name, runner.features_name) == ("probabilities", "features")


def test_failed_check_fails_the_stage_in_one_line(tiny_artifacts, kermany224, tmp_path, capsys):
    root = _copy_model(tiny_artifacts, tmp_path)
    data = _data_dir(root, kermany224, per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        export_stage.main(["--data", str(data), "--model", str(root / "training"), "--out", str(root / "export"),
                           "--tolerance", "-1"])  # nothing can pass a negative tolerance
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ONNX model does not match Keras"), err
    assert not (root / "export" / ONNX_FILE).exists()  # a failed export is never served
    assert not list((root / "export").glob("*partial*"))  # nor left behind under another name
    assert json.loads((root / "export" / "check.json").read_text())["passed"] is False


# --- the two backends agree -----------------------------------------------------------------------

def test_the_check_sample_holds_every_source_and_class_in_its_share(tmp_path):
    rows = [("train", "kermany", "NORMAL", 9)] + [("test", "kermany", "NORMAL", 40), ("test", "kermany", "PNEUMONIA", 100),
                                                 ("test", "tb256", "NORMAL", 20), ("test", "tb256", "TUBERCULOSIS", 40)]
    lines = ["path,label,split,source"] + [f"{label}/{source}-{k}.png,{label},{split},{source}"
                                           for split, source, label, n in rows for k in range(n)]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    sample = export_stage.split_paths(tmp_path, limit=50)
    kinds = [Path(p).parent.name + "/" + Path(p).stem.split("-")[0] for p in sample]
    assert len(sample) == 50 and {k: kinds.count(k) for k in set(kinds)} == {
        "NORMAL/kermany": 10, "PNEUMONIA/kermany": 25, "NORMAL/tb256": 5, "TUBERCULOSIS/tb256": 10}
    assert sample == export_stage.split_paths(tmp_path, limit=50)  # the same films every run
    assert len(export_stage.split_paths(tmp_path)) == 200


@pytest.fixture(scope="module")
def backends(exported) -> dict[str, Predictor]:
    return {b: Predictor.from_artifacts(exported, backend=b) for b in ("onnx", "keras")}


def test_onnx_and_keras_probabilities_agree_on_real_images(backends, originals, kermany224):
    assert {b: c.backend for b, c in backends.items()} == {"onnx": "onnx", "keras": "keras"}
    test224 = sorted((kermany224 / "test").glob("*/*.jpeg"))[::40]
    x = np.stack([backends["keras"].prepare(p.read_bytes()) for p in [*originals, *test224]])
    onnx, keras = backends["onnx"].served_probabilities(x, batch_size=8), backends["keras"].served_probabilities(x, batch_size=8)
    assert onnx.shape == keras.shape == (len(x), 2)
    assert float(np.max(np.abs(onnx - keras))) <= TOLERANCE
    assert (onnx.argmax(1) == keras.argmax(1)).all()
    single = backends["onnx"].served_probabilities(x[:1])  # batch of one, as /predict runs it
    assert float(np.max(np.abs(single - keras[:1]))) <= TOLERANCE


def test_auto_picks_onnx_when_exported_and_keras_when_not(exported, tiny_artifacts, monkeypatch):
    onnx_path, missing = exported / "export" / ONNX_FILE, tiny_artifacts / "export" / ONNX_FILE
    assert choose_backend("auto", onnx_path) == "onnx"
    assert choose_backend(None, onnx_path) == "onnx"  # auto is the default
    assert choose_backend("auto", missing) == "keras"
    assert choose_backend("keras", onnx_path) == "keras"
    with pytest.raises(ModelNotFound, match="export"):
        choose_backend("onnx", missing)
    with pytest.raises(ValueError, match="backend 'tensorrt': choose one of auto, onnx, keras"):
        choose_backend("tensorrt", onnx_path)
    assert Predictor.from_artifacts(exported, backend="auto").backend == "onnx"
    assert Predictor.from_artifacts(tiny_artifacts, backend="auto").backend == "keras"
    monkeypatch.setenv("CHESTXRAY_BACKEND", "onnx")  # set for the app: must not break evaluate / export
    assert Predictor.load(ModelFiles(exported / "training")).backend == "keras"
    # Only the serving configuration reads the variable; a wrong value is named in the app's answer.
    health = create_app({"CHESTXRAY_ARTIFACTS": str(exported), "GEMINI_API_KEY": ""}).test_client().get("/health")
    assert health.get_json()["backend"] == "onnx"
    monkeypatch.setenv("CHESTXRAY_BACKEND", "keras")
    health = create_app({"CHESTXRAY_ARTIFACTS": str(exported), "GEMINI_API_KEY": ""}).test_client().get("/health")
    assert health.get_json()["backend"] == "keras"
    monkeypatch.setenv("CHESTXRAY_BACKEND", "tensorrt")
    health = create_app({"CHESTXRAY_ARTIFACTS": str(exported), "GEMINI_API_KEY": ""}).test_client().get("/health")
    assert health.status_code == 503 and "CHESTXRAY_BACKEND='tensorrt'" in health.get_json()["message"]


def test_corrupted_onnx_fails_clearly(exported, tmp_path):
    root = _copy_model(exported, tmp_path)
    (root / "export").mkdir()
    (root / "export" / ONNX_FILE).write_bytes(b"\x08\x07this is not an onnx model" * 10)
    with pytest.raises(OnnxModelError, match=r"cannot load the ONNX model .*model\.onnx.*export stage"):
        Predictor.from_artifacts(root, backend="auto")
    health = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""}).test_client().get("/health")
    assert health.status_code == 503 and "cannot load the ONNX model" in health.get_json()["message"]


def test_stale_onnx_is_not_served(exported, tmp_path):
    """An export of another model.keras: refused when ONNX is asked for, Keras under auto."""
    import onnx

    root = _copy_model(exported, tmp_path)
    (root / "export").mkdir()
    proto = onnx.load(str(exported / "export" / ONNX_FILE))
    for entry in proto.metadata_props:
        if entry.key == META_KERAS_SHA256:
            entry.value = "0" * 64
    onnx.save(proto, str(root / "export" / ONNX_FILE))
    assert Predictor.from_artifacts(root, backend="auto").backend == "keras"
    with pytest.raises(OnnxModelError, match="not exported from this model.keras"):
        Predictor.from_artifacts(root, backend="onnx")


def _fit_reference(root: Path, kermany224: Path) -> None:
    """artifacts/reference/ for the model under `root`, by the reference stage's own function."""
    from chestxray.pipeline import reference

    files = {c: sorted((kermany224 / "train" / c).glob("*.jpeg")) for c in CLASSES}
    data = write_manifest(root / "data", [{"path": str(p), "label": c, "split": split} for c in CLASSES
                                          for split, chosen in (("train", files[c][:8]), ("val", files[c][8:12]))
                                          for p in chosen])
    params = {"max_train_images": 100, "warn_quantile": 0.99, "exposure_tail": 0.005,
              "max_test_images": 0, "seed": 0}
    reference.reference(params, None, data, root / "training", root / "evaluation", root / "reference")


@pytest.mark.slow
def test_onnx_features_give_the_keras_distances(ood_artifacts, kermany224, originals, tmp_path):
    """ImageNet Xception exported by the stage: the ONNX backend reads the features from its own run and
    gives the Keras population-check distances and verdicts (on real X-rays and on a photo)."""
    from sklearn.datasets import load_sample_image

    root = tmp_path / "artifacts"
    for part in ("training", "evaluation", "reference"):
        shutil.copytree(ood_artifacts / part, root / part)
    export_stage.convert_and_check(root / "training", export_stage.split_paths(_data_dir(tmp_path, kermany224, 2)),
                                   root / "export", TOLERANCE)
    onnx, keras = (Predictor.from_artifacts(root, backend=b) for b in ("onnx", "keras"))
    assert onnx.backend == "onnx" and onnx.population_check.on and keras.population_check.on
    photo = load_sample_image("china.jpg")
    x = np.stack([keras.prepare(p.read_bytes()) for p in originals[:6]] + [keras.prepare(png_bytes(photo[..., ::-1]))])
    distances = {name: [p.ood_distance for p in clf.predict_arrays(x)]
                 for name, clf in (("onnx", onnx), ("keras", keras))}
    assert distances["onnx"] == pytest.approx(distances["keras"], rel=1e-3)
    verdicts = [p.verdict for p in onnx.predict_arrays(x)]
    assert verdicts == [p.verdict for p in keras.predict_arrays(x)] and verdicts[-1] == "warn"  # the photo


@pytest.mark.slow
def test_an_export_without_features_turns_the_check_off(exported, kermany224, tmp_path):
    """An export made before the features output: still served, the check off with what to do."""
    from chestxray.hashing import file_sha256
    from chestxray.model.artifacts import MODEL_FILE
    from chestxray.model.onnx_export import export_onnx

    root = _copy_model(exported, tmp_path)
    _fit_reference(root, kermany224)
    clf = Predictor.load(ModelFiles(root / "training"), backend="keras")
    export_onnx(clf.model, root / "export" / ONNX_FILE, clf.image_size,  # probabilities only, as before
                {META_KERAS_SHA256: file_sha256(root / "training" / MODEL_FILE)})
    old = Predictor.from_artifacts(root, backend="onnx")
    assert old.backend == "onnx" and not old.population_check.on
    reason = old.population_check.info()["reason"]
    assert "no features output" in reason and "dvc repro export" in reason
    assert old.predict_arrays(np.full((1, 96, 96, 3), 128, np.float32))[0].ood_distance is None


# --- the app and the CLI on each backend ----------------------------------------------------------

@pytest.fixture(scope="module")
def clients(exported) -> dict:
    return {b: create_app({"CHESTXRAY_ARTIFACTS": str(exported), "CHESTXRAY_BACKEND": b,
                           "GEMINI_API_KEY": ""}).test_client() for b in ("onnx", "keras")}


def test_app_gives_the_same_answers_on_both_backends(clients, originals):
    for backend, client in clients.items():
        assert client.get("/health").get_json()["backend"] == backend
        assert client.get("/model/info").get_json()["backend"] == backend
    for path in originals[::3]:
        bodies = {b: c.post("/predict", data=upload(path.read_bytes())).get_json() for b, c in clients.items()}
        assert bodies["onnx"]["predicted_class"] == bodies["keras"]["predicted_class"], path.name
        for cls in CLASSES:
            assert bodies["onnx"]["probabilities"][cls] == pytest.approx(bodies["keras"]["probabilities"][cls],
                                                                          abs=TOLERANCE), path.name
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in originals[:3]]
    batch = clients["onnx"].post("/predict/batch", data={"files": files}).get_json()
    single = clients["onnx"].post("/predict", data=upload(originals[2].read_bytes())).get_json()
    assert batch["results"][2]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)
    explained = clients["onnx"].post("/predict/explain", data=upload(originals[2].read_bytes())).get_json()
    assert explained["gradcam_png"]  # Grad-CAM still runs on the Keras model
    assert explained["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)


def test_cli_gives_the_same_answers_on_both_backends(exported, originals, tmp_path):
    from chestxray.cli import main

    rows = {}
    for backend in ("onnx", "keras"):
        out = tmp_path / f"{backend}.csv"
        files = [str(p) for p in originals[:4]]
        assert main(["predict", *files, "--out", str(out), "--artifacts", str(exported), "--backend", backend]) == 0
        with open(out, newline="") as fh:
            rows[backend] = list(csv.DictReader(fh))
    for onnx_row, keras_row in zip(rows["onnx"], rows["keras"], strict=True):
        assert onnx_row["predicted_class"] == keras_row["predicted_class"]
        assert float(onnx_row["p_PNEUMONIA"]) == pytest.approx(float(keras_row["p_PNEUMONIA"]), abs=TOLERANCE)

