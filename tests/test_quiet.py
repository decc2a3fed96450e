"""Quiet by default: `chestxray predict` and the stages print progress, results and errors, not library chatter."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

# Lines TensorFlow, absl and CUDA print while starting up or running (any one of these is chatter).
CHATTER = ("onednn", "absl", "warning:tensorflow", "cuda", "cpu_feature_guard", "tensorflow binary is optimized",
           "userwarning", "retracing")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # The child must pick its own log level: pytest's process already set TF_CPP_MIN_LOG_LEVEL on importing chestxray.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "chestxray.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def two_xrays(kermany224):
    return [str(sorted((kermany224 / "test" / c).glob("*.jpeg"))[0]) for c in ("NORMAL", "PNEUMONIA")]


def test_predict_prints_no_library_chatter(two_xrays, tiny_artifacts, tmp_path):
    out = tmp_path / "results.csv"
    result = run_cli("predict", *two_xrays, "--out", str(out), "--artifacts", str(tiny_artifacts))
    assert result.returncode == 0, result.stderr
    printed = (result.stdout + result.stderr).lower()
    assert [word for word in CHATTER if word in printed] == [], printed
    assert "2 predicted, 0 unreadable" in result.stderr
    assert len(out.read_text().strip().splitlines()) == 3  # header + two images


def test_predict_verbose_still_works(two_xrays, tiny_artifacts, tmp_path):
    # Whatever TensorFlow chooses to say with --verbose, the command still does its job.
    out = tmp_path / "results.csv"
    result = run_cli("predict", *two_xrays, "--out", str(out), "--artifacts", str(tiny_artifacts), "--verbose")
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().strip().splitlines()) == 3


def test_stages_take_verbose():
    from chestxray.pipeline.common import StageParser

    parser = StageParser("A stage.\n\nMore.")
    assert parser.parse_args([]).verbose is False
    assert parser.parse_args(["--verbose"]).verbose is True
    assert parser.description == "A stage."


# Each runs to its first error (nothing to work on in an empty folder), then says whether TensorFlow was loaded.
# Importing it costs 2-3 s on 2 cores: ingest, model_card and promote have no use for it; evaluate does.
COMMANDS = {
    "ingest stage": ("from chestxray.pipeline import ingest; ingest.main(['--params', 'missing.yaml'])", False),
    "model_card stage": ("from chestxray.pipeline import model_card; model_card.main([])", False),
    "chestxray promote": ("from chestxray import cli; cli.main(['promote', '1', '--config', 'missing.yaml'])", False),
    "evaluate stage": ("from chestxray.pipeline import evaluate; evaluate.main([])", True),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_tensorflow_is_loaded_only_by_commands_that_use_it(command, tmp_path):
    statement, uses_tensorflow = COMMANDS[command]
    code = f"import sys\ntry:\n    {statement}\nexcept (SystemExit, Exception):\n    pass\n" \
           "print('tensorflow loaded:', 'tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    assert f"tensorflow loaded: {uses_tensorflow}" in result.stdout, result.stdout + result.stderr


def test_caching_reports_progress_and_never_retraces(capsys):
    import keras
    import tensorflow as tf

    from chestxray.model import training as T

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    try:
        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
        for n in (37, 50, 23, 9, 41):  # uneven last batches, several calls: what used to retrace
            ds = tf.data.Dataset.from_tensor_slices(np.random.rand(n, 8, 8, 3).astype("float32")).batch(8)
            out = T.cache_activations(model, ds, np.empty((n, 6, 6, 4), np.float16), "caching test", every_s=0)
            np.testing.assert_allclose(out[:3], model(ds.unbatch().batch(3).take(1).get_single_element()),
                                       atol=1e-2)
            T.run_in_batches(model, np.random.rand(n, 8, 8, 3).astype(np.float16), 16)
    finally:
        tf_logger.removeHandler(handler)
    assert not [m for m in seen if "retracing" in m], seen
    lines = capsys.readouterr().out.splitlines()
    assert "caching test: 37 of 37 images (100%)" in lines[4]  # a line per batch with every_s=0
