"""chestxray: chest X-ray classification for decision support (never a diagnosis).

Public API:
    chestxray.load_image(path_or_bytes, image_size)  -> model input array
    chestxray.model.predictor.Predictor.from_artifacts("artifacts") -> a trained model ready to predict
"""
import os

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from chestxray.data.preprocess import ImageError, decode_image, load_image, prepare_image  # noqa: E402

__all__ = ["ImageError", "decode_image", "load_image", "prepare_image"]
__version__ = "0.1.0"
