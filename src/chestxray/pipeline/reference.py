"""Stage, reference: what chest X-rays look like to the trained model, for the population check and drift.

    python -m chestxray.pipeline.reference --data artifacts/data --model artifacts/training \
        --evaluation artifacts/evaluation --out artifacts/reference

Runs the model (probabilities and pooled features from one forward pass) over a stratified, seeded
subset of at most `reference.max_train_images` train images and over every validation image. Fits
the Mahalanobis reference (chestxray.model.ood) on the train features and sets its warn threshold
on validation distances only, and records the range of the input's exposure (mean gray level and
spread, all but `reference.exposure_tail` on each side, train subset + validation) that the
population warning's words compare with (chestxray.model.population). Then measures it: the share
of validation and test X-rays (at most `reference.max_test_images`) it warns about. It never
refuses; whether an image is a chest X-ray at all is measured by the detector's own stage. Writes

- reference.npz: the detector, and the reference histograms of every drift signal (evaluation.drift),
- ood.json: threshold, exposure ranges, the measured shares, the drift summaries, timing (read by the
  app and the model card).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config, load_params

def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--evaluation", default="artifacts/evaluation")
    parser.add_argument("--out", default="artifacts/reference")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the pipeline's MLflow run")
    args = parser.parse_args(argv)
    config = None if args.no_mlflow else load_config(args.config)
    run_stage(lambda: reference(load_params(args.params, "reference"), config, Path(args.data), Path(args.model),
                                Path(args.evaluation), Path(args.out)), Path(args.out))


def _sample(paths: list[str], labels, limit: int, seed: int) -> list[str]:
    """At most `limit` of `paths`, each class in its share, seeded; in manifest order."""
    from chestxray.data.split import stratified_subset

    return [paths[i] for i in stratified_subset(labels, limit, seed)]


def _image_sides(paths: list[str]) -> np.ndarray:
    """Longer side in pixels of each image, from its header."""
    from chestxray.data.preprocess import image_dimensions

    return np.array([max(image_dimensions(Path(p).read_bytes())) for p in paths], np.float64)


def shares(verdicts: list[str]) -> dict:
    """How many of a set of images the population check accepts and warns about."""
    from chestxray.model.ood import ACCEPT, WARN

    n = len(verdicts)
    counts = {v: sum(1 for x in verdicts if x == v) for v in (ACCEPT, WARN)}
    return {"n": n, "accepted": counts[ACCEPT], "warned": counts[WARN],
            "warned_share": round(counts[WARN] / n, 4) if n else None}


def _quantiles(values: np.ndarray) -> dict:
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)} | {
        "max": round(float(np.max(values)), 3)}


def reference(params: dict, config: dict | None, data_dir: Path, model_dir: Path, evaluation_dir: Path,
              out: Path) -> dict:
    """Fit the reference, set the threshold on validation, measure; write reference.npz + ood.json (returned)."""
    import pandas as pd

    from chestxray.evaluation import drift
    from chestxray.model.artifacts import ModelFiles
    from chestxray.model.ood import OOD_FILE, OodDetector
    from chestxray.model.population import EXPOSURE, exposure_ranges
    from chestxray.model.predictor import Predictor

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # The thresholds and classes the app serves with, so the reference class mix is what the app would answer.
    predictor = Predictor.load(ModelFiles(model_dir, evaluation_dir), backend="keras")
    manifest = pd.read_csv(data_dir / "manifest.csv")
    rows = {s: manifest[manifest.split == s] for s in ("train", "val", "test")}
    paths = {s: [str(data_dir / p) for p in r.path] for s, r in rows.items()}
    train = _sample(paths["train"], rows["train"].label, params["max_train_images"], params["seed"])
    n_test = params.get("max_test_images", 0)
    test = _sample(paths["test"], rows["test"].label, n_test, params["seed"]) if n_test > 0 else []
    if not paths["val"]:
        raise ValueError(f"{data_dir / 'manifest.csv'} lists no validation images to set the thresholds on")

    inputs: list[dict[str, np.ndarray]] = []  # intensity signals of the train subset and validation images
    _, train_features = predictor.served_outputs_for_files(
        train, on_batch=lambda x: inputs.append(drift.input_signals(x)))
    val_probs, val_features = predictor.served_outputs_for_files(
        paths["val"], on_batch=lambda x: inputs.append(drift.input_signals(x)))
    if train_features is None:
        raise ValueError("the model gives no pooled features (no 'pool' layer): cannot fit the reference")
    detector = OodDetector.fit(train_features)
    val_distances = detector.distances(val_features)
    detector.set_threshold(val_distances, params["warn_quantile"])
    features_s = time.perf_counter() - started

    val_predictions = predictor.predictions(val_probs)
    signals = {name: np.concatenate([batch[name] for batch in inputs]) for name in inputs[0]}
    signals[drift.IMAGE_SIDE.name] = _image_sides(train + paths["val"])
    signals[drift.CONFIDENCE.name] = np.array([p.confidence for p in val_predictions])
    ood_signal = drift.ood_signal(4 * detector.warn)  # far images go in the last bin
    signals[ood_signal.name] = val_distances
    histograms = {f"hist_{s.name}": s.histogram(signals[s.name])
                  for s in (drift.INTENSITY_MEAN, drift.INTENSITY_STD, drift.IMAGE_SIDE, drift.CONFIDENCE, ood_signal)}
    histograms[drift.OOD_EDGES] = np.asarray(ood_signal.edges)
    class_mix = {c: sum(1 for p in val_predictions if p.predicted_class == c) for c in predictor.classes}

    summary = {
        "method": "Mahalanobis distance of the model's pooled backbone features to training X-rays "
                  "(mean and Ledoit-Wolf covariance); warn threshold on validation X-rays only; never refuses",
        "keras_sha256": predictor.keras_sha256,
        "feature_dim": int(train_features.shape[1]),
        "n_train_images": len(train),
        "n_val_images": len(paths["val"]),
        "thresholds": {"warn_distance": round(detector.warn, 4), "warn_quantile": params["warn_quantile"],
                       "chosen_on": "validation"},
        EXPOSURE: {**exposure_ranges(signals, params["exposure_tail"]), "source": "train subset + validation"},
        "validation": {**shares([detector.verdict(d) for d in val_distances]), "distance": _quantiles(val_distances)},
    }
    if test:
        _, test_features = predictor.served_outputs_for_files(test)
        test_distances = detector.distances(test_features)
        summary["test_xrays"] = {**shares([detector.verdict(d) for d in test_distances]),
                                 "distance": _quantiles(test_distances)}
    summary["drift_reference"] = {
        **{name: {"n": int(len(v)), "mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}
           for name, v in signals.items()},
        "class_mix": class_mix,
        "sources": {"intensity_mean, intensity_std, image_side": "train subset + validation",
                    "confidence, ood_distance, class_mix": "validation"},
    }
    summary["time_s"] = {"features": round(features_s, 1), "total": round(time.perf_counter() - started, 1)}

    detector.save(out, histograms)
    (out / OOD_FILE).write_text(json.dumps(summary, indent=2))
    _report(summary)
    if config is not None:
        _log(config, model_dir, out, summary)
    return summary


def _report(summary: dict) -> None:
    t = summary["thresholds"]
    line = (f"reference: {summary['n_train_images']} train images, {summary['feature_dim']} features; "
            f"warn from {t['warn_distance']:.2f} (validation)")
    for key, label in (("validation", "validation X-rays warned"), ("test_xrays", "test X-rays warned")):
        if key in summary:
            line += f"; {label} {100 * summary[key]['warned_share']:.1f}% of {summary[key]['n']}"
    print(line + f"; {summary['time_s']['total']:.0f}s")


def _log(config: dict, model_dir: Path, out: Path, summary: dict) -> None:
    """Log the figures and the two files to the MLflow run that train opened."""
    import mlflow

    from chestxray import tracking
    from chestxray.model.ood import OOD_FILE, REFERENCE_FILE

    figures = {"ood.warn_distance": summary["thresholds"]["warn_distance"],
               "ood.val_warned_share": summary["validation"]["warned_share"]}
    if "test_xrays" in summary:
        figures["ood.test_warned_share"] = summary["test_xrays"]["warned_share"]
    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        mlflow.log_metrics(figures)
        mlflow.log_artifact(str(out / OOD_FILE), "reference")
        mlflow.log_artifact(str(out / REFERENCE_FILE), "reference")


if __name__ == "__main__":
    main()
