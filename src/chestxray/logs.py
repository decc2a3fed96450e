"""What the command line prints: what a user needs (progress, results, errors), not the libraries' chatter.

`quiet_libraries(verbose)` runs once at the start of every `chestxray` command and pipeline stage
(`--verbose` turns the chatter back on). Where TensorFlow will be used it imports it itself, quietly:
its C++ log level is read once, at import, and some of its start-up lines ignore it. Commands that never
use it (ingest, model_card, promote) pass `tensorflow=False` and save the 2-3 s import.
"""
from __future__ import annotations

import logging
import os
import warnings

# Python warnings that say nothing a user can act on. Each is matched on the start of its message.
NOISY_WARNINGS = (
    r"`shuffle=True` was passed, but will be ignored",  # Keras, when fit() gets a tf.data.Dataset
    r"Skipping variable loading for optimizer",  # Keras, loading a model saved with its optimizer
    r"Compiled the loaded model, but the compiled metrics have yet to be built",
    r"Your `PyDataset` class should call",
    r"Protobuf gencode version",  # protobuf runtime newer than the generated code: harmless
)
NOISY_LOGGERS = ("tensorflow", "absl", "h5py", "jax")


def quiet_libraries(verbose: bool = False, tensorflow: bool = True) -> None:
    """Quiet TensorFlow (C++ and Python), absl and known library warnings; `verbose=True` shows everything.

    `tensorflow=True` also imports TensorFlow now, with its start-up lines silenced (for commands that use it).
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("chestxray").setLevel(logging.DEBUG)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        warnings.simplefilter("default")
        return
    # 2 hides TensorFlow's C++ INFO and WARNING lines (oneDNN, CUDA and cpu-feature notices); a user's own
    # value, e.g. 0 while debugging, is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging  # present with TensorFlow; cheap, and TensorFlow is not loaded

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if tensorflow:
        _import_tensorflow_silently()


def _import_tensorflow_silently() -> None:
    """Import TensorFlow now, its C-level stderr sent to /dev/null for the import only.

    TensorFlow 2.21 writes absl's "All log messages before absl::InitializeLog()" and the oneDNN notice
    straight to file descriptor 2 on some CPUs, whatever TF_CPP_MIN_LOG_LEVEL says. An import error
    is still raised (and shown) once the descriptor is back.
    """
    import importlib.util
    import sys

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
