"""Shortcut checks: does the model see tuberculosis, or the hospital the film came from?

The TB films come from two collections that share nothing but the disease (see the data README):
  tb256/hospital  TB.N.jpg + others_N.jpg       one unidentified hospital, JPEG, text burned in
  tb256/public    Tuberculosis-N.png + Normal-N.png  public compilations, PNG
and the pneumonia and child normals from a third (kermany). Three measurements, all through the
project's own network code (build_model, split_model, the head and fine-tuning of training.py):
  - TB vs normal *within* each collection (the source held fixed);
  - a probe: how well pooled features predict the collection (logistic regression, grouped CV);
  - TB detection *across* collections: fit on one collection's TB + normal films, test on the other's.
research/04_cross_source_tb.py runs them on tb256 and writes the JSON the docs and the model card read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

# Mirrors params.yaml data.sources (tb256's collections): the file name tells the collection apart.
TB256_COLLECTIONS = {"hospital": r"^(TB\.\d+|others_\d+)\.jpg$", "public": r"^(Tuberculosis|Normal)-\d+\.png$"}


def collection_table(root: str | Path, source: str = "tb256",
                     collections: dict[str, str] | None = None) -> pd.DataFrame:
    """path, label (class folder), collection ("<source>/<name>") of every image under root/<CLASS>/."""
    collections = collections or TB256_COLLECTIONS
    rows = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            name = next((n for n, rx in collections.items() if re.match(rx, path.name)), None)
            if name is not None:
                rows.append({"path": str(path), "label": folder.name, "collection": f"{source}/{name}"})
    return pd.DataFrame(rows)


def near_duplicate_groups(paths: list[str]) -> np.ndarray:
    """A group id per image, with ingest's rule (chestxray.data.duplicates, NEAR_DUPLICATE_DISTANCE):
    images whose perceptual hashes are that close are linked, and linked images share a group."""
    from PIL import Image

    from chestxray.data.duplicates import NEAR_DUPLICATE_DISTANCE, connected_groups, near_pairs, perceptual_hash

    hashes = np.stack([perceptual_hash(np.asarray(Image.open(p).convert("L"))) for p in paths])
    return connected_groups(len(paths), [(i, j) for i, j, _ in near_pairs(hashes, NEAR_DUPLICATE_DISTANCE)])


def grouped_halves(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask of about half the images, whole near-duplicate groups only, stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    first, _ = next(StratifiedGroupKFold(2, shuffle=True, random_state=seed).split(labels, labels, groups))
    mask = np.zeros(len(labels), bool)
    mask[first] = True
    return mask


# --- the project's network, cut where training cuts it ---------------------------------------------------------

def split_network(base: dict, fine_tune_from: str, num_classes: int = 2, truncate: bool = True):
    """build_model + split_model as the pipeline does them (params.yaml base_model), ImageNet weights."""
    from chestxray.model.backbones import resolve
    from chestxray.model.build import build_model
    from chestxray.model.training import split_model

    truncate_before, fine_tune_from = resolve(base["backbone"], base.get("truncate_before", "auto"), fine_tune_from)
    model = build_model(base["backbone"], base["image_size"], num_classes, base["weights"], base["dropout"],
                        base.get("dense_units", 0), truncate_before if truncate else None)
    return split_model(model, fine_tune_from)


def bottom_activations(split, paths: list[str], image_size: int, transform: Callable | None = None,
                       batch_size: int = 32) -> np.ndarray:
    """The frozen bottom's activations (float16) for image files, through the shared preprocessing.

    `transform(gray) -> gray` is applied to the decoded image first (a mitigation being tried).
    """
    import tensorflow as tf

    from chestxray.data.preprocess import decode_image, prepare_image

    run = tf.function(lambda x: split.bottom(x, training=False), reduce_retracing=True)
    out = np.empty((len(paths), *split.bottom.output.shape[1:]), np.float16)
    for i in range(0, len(paths), batch_size):
        grays = [decode_image(Path(p).read_bytes()) for p in paths[i:i + batch_size]]
        batch = np.stack([prepare_image(transform(g) if transform else g, image_size) for g in grays])
        out[i:i + len(batch)] = run(batch).numpy()
    return out


# --- mitigations (candidates; one is chosen on validation) --------------------------------------------------------

def reencode(gray: np.ndarray, size: int = 256, quality: int = 75) -> np.ndarray:
    """Every image the same way: grayscale, size x size, one JPEG encoding at `quality`."""
    import cv2

    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def equalise(gray: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each film's grey levels spread the same way, whatever its exposure and LUT."""
    import cv2

    return cv2.equalizeHist(gray)


MITIGATIONS: dict[str, Callable | None] = {"none": None, "reencode_jpeg75": reencode,
                                           "equalise": equalise, "equalise_reencode": lambda g: reencode(equalise(g))}


# --- probes and heads --------------------------------------------------------------------------------------------

def probe_auc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              c: float = 1.0) -> float:
    """ROC AUC on test of a standardised logistic regression fitted on train (the frozen-feature probe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))
    model.fit(train_x, train_y)
    return float(roc_auc_score(test_y, model.predict_proba(test_x)[:, 1]))


def source_probe(features: np.ndarray, collections: np.ndarray, groups: np.ndarray | None = None,
                 folds: int = 5, seed: int = 0) -> dict:
    """How well features predict the collection: grouped, stratified k-fold logistic regression.

    Returns accuracy, the chance level (the largest collection's share), and one-vs-rest ROC AUC
    per collection. Near 1.0 means the features carry where an image came from.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names, y = np.unique(np.asarray(collections).astype(str), return_inverse=True)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = min(folds, int(np.bincount(y).min()))
    if len(names) < 2 or folds < 2:
        return {"n": int(len(y)), "collections": names.tolist(), "skipped": "needs two collections, 2+ images each"}
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, features, y, groups=groups, cv=cv, method="predict_proba")
    out = {"n": int(len(y)), "folds": folds, "accuracy": float((probs.argmax(1) == y).mean()),
           "chance_accuracy": float(np.bincount(y).max() / len(y))}
    out["roc_auc"] = {name: float(roc_auc_score(y == k, probs[:, k])) for k, name in enumerate(names)}
    return out


def fit_head(split, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             train: dict, fine_tune_epochs: int = 0) -> None:
    """Train the project's head on cached bottom activations (phase 1), then optionally fine-tune the
    top blocks with it (phase 2): training.py's losses, class weights, optimisers and early stopping
    on validation AUC (best epoch's weights restored)."""
    import keras

    from chestxray.model import training as T

    keras.utils.set_random_seed(train["seed"])
    n, batch = 2, train["batch_size"]
    weights = T.class_weights(train_y, n)
    loss = T.make_loss("weighted_ce")

    def fit(model, x_train, x_val, epochs, optimizer):
        model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.AUC(name="auc")])
        stop = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=train["patience"],
                                             restore_best_weights=True)
        model.fit(T.arrays_dataset(x_train, train_y, n, batch, train["seed"]),
                  validation_data=T.arrays_dataset(x_val, val_y, n, batch), epochs=epochs, class_weight=weights,
                  callbacks=[stop], verbose=0, shuffle=False)  # the dataset shuffles itself

    T.set_fine_tuning(split, False)
    pooled_train, pooled_val = (T.run_in_batches(split.pooled, x, 64) for x in (train_x, val_x))
    fit(split.head, pooled_train, pooled_val, train["head_epochs"], keras.optimizers.Adam(train["head_lr"]))
    if fine_tune_epochs:
        T.set_fine_tuning(split, True)
        steps = -(-len(train_x) // batch) * fine_tune_epochs
        fit(split.top, train_x, val_x, fine_tune_epochs,
            keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(train["fine_tune_lr"], steps)))


def head_scores(split, x: np.ndarray) -> np.ndarray:
    """P(positive class) of the whole top (fine-tuned blocks + head) on cached bottom activations."""
    from chestxray.model import training as T

    return T.run_in_batches(split.top, x, 64)[:, 1]
