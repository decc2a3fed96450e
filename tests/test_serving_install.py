"""The serving lock alone runs the app: a fresh venv with requirements/serving.txt and the wheel (--no-deps).

That is what the Docker image installs. In it: the app serves the tiny model from an artifacts folder (ONNX
Runtime computes, TensorFlow draws the Grad-CAM, the Gemini client is imported and fails over to no
explanation) and from a SQLite MLflow registry (mlflow-skinny + SQLAlchemy + Alembic), gunicorn loads the
app with gunicorn.conf.py, `chestxray predict` writes its CSV and heatmaps, and the pipeline's tools are absent.
The venv is made with uv (in the dev lock): from its cache it takes seconds, not pip's minutes.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ADMIN_KEY, API_KEYS, CLASSES, ROOT, USER_KEY, free_port, missing

pytestmark = pytest.mark.slow  # a venv of ~90 packages (seconds from uv's cache; a first run downloads them)

ABSENT = ["sklearn", "pandas", "pyarrow", "matplotlib", "dvc", "tf2onnx", "onnx", "pytest", "playwright",
          "schemathesis", "skimage", "imagehash", "gdown"]

SERVE = textwrap.dedent("""
    import importlib.metadata, importlib.util, io, json, sys
    from chestxray.serving import create_app

    args = json.loads(sys.argv[1])
    image = open(args["image"], "rb").read()
    user, admin = {"X-API-Key": args["user"]}, {"X-API-Key": args["admin"]}
    out = {"absent": [m for m in args["absent"] if importlib.util.find_spec(m) is None]}
    try:
        importlib.metadata.distribution("mlflow")
        out["full_mlflow"] = True
    except importlib.metadata.PackageNotFoundError:
        out["full_mlflow"] = False
    for name, config in args["apps"].items():
        web = create_app(config).test_client()
        got = out[name] = {"health": web.get("/health").get_json(), "info": web.get("/model/info", headers=user).get_json()}
        predict = web.post("/predict", data={"file": (io.BytesIO(image), "x.jpeg")}, headers=user)
        got["predict"] = [predict.status_code, predict.get_json()]
        explain = web.post("/predict/explain", data={"file": (io.BytesIO(image), "x.jpeg")}, headers=user)
        body = explain.get_json()
        got["explain"] = [explain.status_code, bool(body.get("gradcam_png")), body.get("explanation_error")]
        got["monitoring"] = web.get("/monitoring", headers=admin).status_code
        metrics = web.get("/metrics")
        got["metrics"] = [metrics.status_code, "chestxray" in metrics.get_data(as_text=True)]
    print(json.dumps(out))
""")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd[:4]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A venv holding requirements/serving.txt and the project's wheel, nothing else."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        missing("uv is not installed (`make setup` installs requirements/dev.txt, which has it)")
    tmp = tmp_path_factory.mktemp("serving-venv")
    source = tmp / "source"  # built from a copy: a build in the checkout would leave build/ and *.egg-info
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    env = {**os.environ, "VIRTUAL_ENV": ""}
    _run([uv, "venv", "-q", "--python", sys.executable, venv], env=env)
    _run([uv, "pip", "install", "-q", "--python", python, "-r", ROOT / "requirements" / "serving.txt"], env=env)
    _run([uv, "pip", "install", "-q", "--python", python, "--no-deps", source], env=env)
    return venv


@pytest.fixture()
def registry(tiny_artifacts, kermany224, tmp_path, monkeypatch) -> str:
    """The tiny model registered as chestxray@champion in a SQLite store under tmp_path (the pipeline's code)."""
    import mlflow

    from chestxray import tracking
    from chestxray.model.artifacts import INFO_FILE, METRICS_FILE, THRESHOLDS_FILE, ModelFiles
    from chestxray.model.predictor import Predictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the store's default artifact root (./mlruns) lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.end_run()
    try:
        tracking.setup({"mlflow": {"tracking_uri": uri, "experiment": "chestxray", "registered_model": "chestxray"}})
        training, evaluation = tiny_artifacts / "training", tiny_artifacts / "evaluation"
        predictor = Predictor.load(ModelFiles(training, evaluation), backend="keras")
        image = sorted((kermany224 / "test" / "NORMAL").glob("*.jpeg"))[0]
        example = predictor.prepare(image.read_bytes())[None]
        with mlflow.start_run():
            mlflow.log_artifact(str(evaluation / "model_card.md"), "evaluation")
            version = tracking.log_model(predictor.model, example, predictor.raw_probabilities(example),
                                         [training / INFO_FILE, evaluation / THRESHOLDS_FILE, evaluation / METRICS_FILE],
                                         "chestxray", keras_sha256=predictor.keras_sha256)
        assert tracking.promote_if_lower_log_loss("chestxray", version, 0.3, 0.005)["promoted"]
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


def test_the_serving_lock_alone_serves_predicts_and_loads_from_the_registry(serving_venv, tiny_exported, registry,
                                                                             kermany224, tmp_path):
    bin_ = serving_venv / "bin"
    images = tmp_path / "images"
    images.mkdir()
    for name in CLASSES:
        shutil.copy(sorted((kermany224 / "test" / name).glob("*.jpeg"))[0], images / f"{name}.jpeg")
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_TRACKING_URI": registry, "CHESTXRAY_API_KEYS": API_KEYS}
    common = {"GEMINI_API_KEY": "stand-in", "GEMINI_BASE_URL": f"http://127.0.0.1:{free_port()}",  # refused at once
              "GEMINI_TIMEOUT_S": 2, "CHESTXRAY_RATE_LIMIT_PER_MIN": 0}
    args = {"image": str(images / "PNEUMONIA.jpeg"), "user": USER_KEY, "admin": ADMIN_KEY, "absent": ABSENT,
            "apps": {"artifacts": {**common, "CHESTXRAY_ARTIFACTS": str(tiny_exported)},
                     "registry": {**common, "CHESTXRAY_MODEL_URI": "models:/chestxray@champion"}}}
    served = json.loads(_run([bin_ / "python", "-c", SERVE, json.dumps(args)], cwd=tmp_path, env=env)
                        .stdout.strip().splitlines()[-1])

    assert served["absent"] == ABSENT and not served["full_mlflow"]  # the pipeline's and the tests' tools are not there
    for name, backend in (("artifacts", "onnx"), ("registry", "keras")):
        got = served[name]
        assert got["health"]["status"] == "ready", got["health"]
        assert got["info"]["backend"] == backend, got["info"]
        status, prediction = got["predict"]
        assert status == 200 and prediction["predicted_class"] in CLASSES, prediction
        assert got["explain"][:2] == [200, True], got["explain"]  # the heatmap (TensorFlow) ...
        assert got["explain"][2], got["explain"]  # ... and a Gemini failure reported, not raised
        assert got["monitoring"] == 200 and got["metrics"] == [200, True]
    assert served["registry"]["info"]["model_version"] == "chestxray/1"

    # The batch command, in the same venv.
    out = tmp_path / "results.csv"
    _run([bin_ / "chestxray", "predict", images, "--out", out, "--artifacts", tiny_exported, "--heatmaps",
          tmp_path / "heatmaps"], cwd=tmp_path, env=env)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and len(list((tmp_path / "heatmaps").glob("*.png"))) == 2

    # gunicorn loads app.py with gunicorn.conf.py (the image's CMD); no model here: the app starts without one.
    for name in ("app.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    _run([bin_ / "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "app:app"], cwd=tmp_path,
         env={**env, "CHESTXRAY_ARTIFACTS": str(tmp_path / "no-model-here")})
