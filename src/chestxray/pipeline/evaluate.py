"""Stage 4, evaluate: calibrate and choose thresholds on validation, score the untouched test split.

    python -m chestxray.pipeline.evaluate --data artifacts/data --model artifacts/training --out artifacts/evaluation

On validation, in this order: the temperature (temperature scaling), then on the calibrated
probabilities the app serves the decision threshold and the low-confidence threshold.
Writes metrics.json (DVC metrics), thresholds.json (read by the app), predictions.csv, plot data
under plots/ and figures under figures/; logs all of it to the MLflow run that train opened.
metrics.json "val" holds the validation log-loss of the calibrated probabilities, which the
register stage (after export and reference) compares with the champion's.
"""
from __future__ import annotations

from pathlib import Path

from chestxray.atomic import atomic_path, write_json
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config, load_params


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--out", default="artifacts/evaluation")
    args = parser.parse_args(argv)
    run_stage(lambda: evaluate(load_params(args.params, "evaluate"), load_config(args.config), Path(args.data),
                               Path(args.model), Path(args.out)), Path(args.out))


def evaluate(params: dict, config: dict, data_dir: Path, model_dir: Path, out: Path) -> None:
    """Score the model; write metrics, thresholds, predictions, plots; log them to the MLflow run."""
    import mlflow
    import numpy as np
    import pandas as pd

    from chestxray import tracking
    from chestxray.evaluation.plots import roc_table, save_figures, write_plot_data
    from chestxray.model.artifacts import METRICS_FILE, THRESHOLDS_FILE, ModelFiles
    from chestxray.model.predictor import Predictor

    # No evaluation dir: temperature 1, i.e. the network's own probabilities (TTA-averaged if asked).
    predictor = Predictor.load(ModelFiles(model_dir), backend="keras", tta=bool(params.get("tta", False)))
    classes, normal = predictor.classes, predictor.normal_class
    manifest = pd.read_csv(data_dir / "manifest.csv")
    rows = {s: manifest[manifest.split == s] for s in ("val", "test")}
    y = {s: np.array([classes.index(c) for c in r.label]) for s, r in rows.items()}
    outputs = {s: predictor.served_outputs_for_files([str(data_dir / p) for p in r.path]) for s, r in rows.items()}
    raw = {s: probabilities for s, (probabilities, _) in outputs.items()}

    thresholds, probs = fit_on_validation(params, y, raw, classes, normal)
    metrics, tables = score(params, y, raw, probs, classes, normal, thresholds)
    metrics.update(by_source(params, rows["test"], y["test"], probs["test"], tables["predicted"], classes, normal,
                             thresholds["decision_threshold"]))
    probe = source_probe(rows, {s: features for s, (_, features) in outputs.items()})
    if probe is not None:
        metrics["source_probe"] = probe
    threshold = thresholds["decision_threshold"]

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    write_json(out / THRESHOLDS_FILE, thresholds)
    origin = {c: rows["test"][c].values for c in ORIGIN_COLUMNS if c in rows["test"]}
    predictions = pd.DataFrame({"path": rows["test"].path.values, "label": rows["test"].label.values, **origin,
                                "predicted": [classes[k] for k in tables["predicted"]],
                                **{f"p_{c}": probs["test"][:, k] for k, c in enumerate(classes)},
                                "low_confidence": tables["low_confidence"]})
    with atomic_path(out / "predictions.csv") as temp:
        predictions.to_csv(temp, index=False)
    roc = roc_table(y["test"], probs["test"], classes, normal)
    write_plot_data(out / "plots", y["test"], tables["predicted"], classes, roc, tables["reliability"])
    figures = save_figures(out / "figures", tables["confusion"], classes, roc, tables["reliability"],
                           metrics["roc_auc"])
    print(f"test: accuracy {metrics['accuracy']:.4f}, ROC AUC {metrics['roc_auc']:.4f}, "
          f"sensitivity {metrics.get('sensitivity', float('nan')):.4f}, specificity "
          f"{metrics.get('specificity', float('nan')):.4f}, ECE {metrics['ece']:.4f} "
          f"(uncalibrated {metrics['ece_uncalibrated']:.4f}; temperature {thresholds['temperature']:.3f} and "
          f"threshold {threshold:.3f} from val); low confidence below {thresholds['low_confidence']:.3f}: "
          f"{metrics['low_confidence']['flagged_share']:.1%} of test flagged")
    for name, scores in metrics["per_class"].items():
        print(f"  {name}: recall {scores['recall']:.4f} (95% CI {scores['recall_ci95_low']:.4f}-"
              f"{scores['recall_ci95_high']:.4f}, n={scores['support']}), one-vs-rest ROC AUC {scores['roc_auc']:.4f}")
    if "benchmark" in metrics:
        bench = metrics["benchmark"]
        print(f"  two-class benchmark ({bench['n']} images): accuracy {bench['accuracy']:.4f}, ROC AUC "
              f"{bench['roc_auc']:.4f} (served {len(classes)}-class call: accuracy {bench['accuracy_served']:.4f})")

    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        flat = {k: v for k, v in tracking.flatten(metrics).items() if isinstance(v, (int, float)) and np.isfinite(v)}
        mlflow.log_metrics({k if k.startswith("val.") or k == "temperature" else f"test.{k}": v
                            for k, v in flat.items()})
        mlflow.log_params(tracking.flatten({"evaluate": params}))
        for figure in figures:
            mlflow.log_artifact(str(figure), "figures")
        mlflow.log_artifact(str(out / "predictions.csv"), "evaluation")


# Manifest columns that say where an image came from (ingest writes them; older manifests lack them).
ORIGIN_COLUMNS = ("source", "collection")


def by_source(params: dict, test: "pd.DataFrame", y, probs, predicted, classes: list[str], normal: str | None,
              threshold: float) -> dict:
    """metrics.json blocks per source and per collection, and the two-class benchmark on one source's images.

    The benchmark (params `benchmark`: source and the two classes) takes the test images of that
    source (all of them when the run has one source, e.g. `data.source`, whatever its name), so a
    three-class run and a two-class run can be compared key for key with `dvc metrics diff`.
    """
    import numpy as np

    from chestxray.evaluation.per_source import group_metrics, two_class_benchmark

    out = {}
    for column in ORIGIN_COLUMNS:
        if column in test:
            out[f"per_{column}"] = group_metrics(y, probs, predicted, classes, normal, test[column].values)
    spec = params.get("benchmark") or {}
    if spec and normal is not None:
        one_source = "source" not in test or test.source.nunique() <= 1
        rows = np.ones(len(test), bool) if one_source else (test.source == spec["source"]).values
        bench = two_class_benchmark(y[rows], probs[rows], predicted[rows], classes, list(spec["classes"]), normal,
                                    threshold, params["calibration_bins"])
        if bench is not None:
            out["benchmark"] = bench
    return out


def source_probe(rows: dict, features: dict) -> dict | None:
    """How well the model's pooled features (val + test) tell the collections apart: grouped 5-fold
    logistic regression (chestxray.evaluation.shortcuts.source_probe). None with one collection."""
    import numpy as np
    import pandas as pd

    from chestxray.evaluation.shortcuts import source_probe as probe

    both = pd.concat([rows["val"], rows["test"]])
    column = next((c for c in ("collection", "source") if c in both), None)
    if column is None or both[column].nunique() < 2 or any(features[s] is None for s in ("val", "test")):
        return None
    groups = both["group"].astype(str).values if "group" in both else None
    return probe(np.concatenate([features["val"], features["test"]]), both[column].values, groups)


def fit_on_validation(params: dict, y: dict, raw: dict, classes: list[str],
                      normal: str | None) -> tuple[dict, dict]:
    """(thresholds.json content, served probabilities per split): temperature, then decision and
    low-confidence thresholds, each chosen on validation only, on the probabilities the app serves."""
    from chestxray.evaluation.calibration import (apply_temperature, choose_low_confidence, fit_temperature,
                                                  served_confidence)
    from chestxray.evaluation.metrics import choose_threshold
    from chestxray.model.decision import decide

    temperature = fit_temperature(y["val"], raw["val"])
    probs = {s: apply_temperature(p, temperature) for s, p in raw.items()}
    threshold = choose_threshold(y["val"], probs["val"], classes, normal)  # after calibration, as served
    predicted = decide(probs["val"], classes, normal, threshold)
    low = choose_low_confidence(served_confidence(probs["val"], predicted), predicted == y["val"],
                                params["low_confidence_target_accuracy"])
    thresholds = {"decision_threshold": threshold, "low_confidence": low.pop("threshold"),
                  "temperature": temperature, "tta": bool(params.get("tta", False)), "chosen_on": "validation",
                  "rule": "abnormal when 1 - P(normal) >= decision_threshold, then the most probable other class; "
                          "else normal; P = softmax(log p / temperature) (docs/three-class.md)",
                  "low_confidence_rule": low}
    return thresholds, probs


def score(params: dict, y: dict, raw: dict, probs: dict, classes: list[str], normal: str | None,
          thresholds: dict) -> tuple[dict, dict]:
    """(metrics.json content, tables for plots) on test, with validation scores and ECE before calibration."""
    from sklearn.metrics import log_loss

    from chestxray.evaluation.calibration import served_confidence
    from chestxray.evaluation.metrics import classification_metrics, expected_calibration_error

    bins, threshold = params["calibration_bins"], thresholds["decision_threshold"]
    val_metrics, _ = classification_metrics(y["val"], probs["val"], classes, normal, threshold, bins)
    metrics, tables = classification_metrics(y["test"], probs["test"], classes, normal, threshold, bins)
    metrics["ece_uncalibrated"] = expected_calibration_error(y["test"], raw["test"], bins)[0]
    metrics["temperature"] = thresholds["temperature"]
    metrics["val"] = {k: val_metrics[k] for k in ("accuracy", "roc_auc", "ece")}
    metrics["val"]["ece_uncalibrated"] = expected_calibration_error(y["val"], raw["val"], bins)[0]
    # Cross-entropy of the calibrated probabilities: what the register stage promotes on (ROC AUC saturates).
    metrics["val"]["log_loss"] = float(log_loss(y["val"], probs["val"], labels=list(range(len(classes)))))
    confidence = served_confidence(probs["test"], tables["predicted"])
    flagged = confidence < thresholds["low_confidence"]
    correct = tables["predicted"] == y["test"]
    metrics["low_confidence"] = {
        "threshold": thresholds["low_confidence"], "flagged_share": float(flagged.mean()),
        "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
        "accuracy_not_flagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
        "val_flagged_share": thresholds["low_confidence_rule"]["flagged_share"]}
    metrics["n_test"] = int(len(y["test"]))
    tables["low_confidence"] = flagged
    return metrics, tables


if __name__ == "__main__":
    main()
