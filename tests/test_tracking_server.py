"""A team's MLflow server (docs/tracking.md): the project's own code logs and registers a real model to a real
`mlflow server` over HTTP, and the app serves `models:/chestxray@champion` from it."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from helpers import free_port

pytestmark = pytest.mark.slow

CLASSES = ["NORMAL", "PNEUMONIA"]


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` as docs/tracking.md starts it (SQLite store, artifacts proxied by the server); its URL."""
    port = free_port()
    log = open(root / "server.log", "w")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # A session of its own: the server's workers stop with it.
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or starting up
                pass
            assert time.monotonic() < deadline, f"mlflow server not ready:\n{(root / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_model_registered_on_a_tracking_server_is_served_from_it(tiny_artifacts, kermany224, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from chestxray import tracking
    from chestxray.model.artifacts import INFO_FILE, METRICS_FILE, THRESHOLDS_FILE, ModelFiles
    from chestxray.model.predictor import Predictor
    from chestxray.serving import create_app

    image = sorted((kermany224 / "test" / "NORMAL").glob("*.jpeg"))[0]
    previous_uri = mlflow.get_tracking_uri()
    with mlflow_server(tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # as the pipeline and the app would be run
        try:
            # What the register stage does, with the project's own code: log and register the model, give it the alias.
            config = {"mlflow": {"tracking_uri": "sqlite:///unused.db", "experiment": "chestxray",
                                 "registered_model": "chestxray"}}
            assert tracking.setup(config) == url
            training, evaluation = tiny_artifacts / "training", tiny_artifacts / "evaluation"
            predictor = Predictor.load(ModelFiles(training, evaluation), backend="keras")
            example = predictor.prepare(image.read_bytes())[None]
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(evaluation / "model_card.md"), "evaluation")
                version = tracking.log_model(predictor.model, example, predictor.raw_probabilities(example),
                                             [training / INFO_FILE, evaluation / THRESHOLDS_FILE,
                                              evaluation / METRICS_FILE], "chestxray",
                                             keras_sha256=predictor.keras_sha256)
                assert tracking.promote_if_lower_log_loss("chestxray", version, 0.3, 0.005)["promoted"]
            client = MlflowClient()
            assert client.get_model_version_by_alias("chestxray", tracking.CHAMPION).run_id == run.info.run_id
            # The server stores the files: clients send them over HTTP, they need no access to its disk.
            assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
            assert any((tmp_path / "artifacts").rglob("model.keras"))

            app = create_app({"CHESTXRAY_MODEL_URI": "models:/chestxray@champion", "GEMINI_API_KEY": "",
                              "CHESTXRAY_RATE_LIMIT_PER_MIN": 0})
            web = app.test_client()
            info = web.get("/model/info")
            assert info.status_code == 200, info.get_json()
            assert info.get_json()["model_version"] == f"chestxray/{version}"
            assert info.get_json()["test_metrics"] == json.loads((evaluation / METRICS_FILE).read_text())
            assert web.get("/model/card").status_code == 200  # the run's card came from the server too
            response = web.post("/predict", data={"file": (io.BytesIO(image.read_bytes()), image.name)})
            assert response.status_code == 200, response.get_json()
            prediction = response.get_json()
            assert prediction["predicted_class"] in CLASSES and prediction["model_version"] == f"chestxray/{version}"
            expected = predictor.predict_bytes(image.read_bytes())
            assert prediction["probabilities"] == pytest.approx(expected.probabilities, abs=1e-4)
        finally:
            mlflow.set_tracking_uri(previous_uri)
