"""Stage 4, evaluate: choose the decision threshold on validation, score the untouched test split, register.

    python -m chestxray.pipeline.evaluate --data artifacts/data --model artifacts/training --out artifacts/evaluation

Writes metrics.json (DVC metrics), thresholds.json (read by the app), predictions.csv, plot data
under plots/ and figures under figures/; logs all of it and the model to the MLflow run that train
opened, registers the model and moves the `champion` alias to it if it beats the champion on validation.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chestxray.atomic import atomic_path, write_json
from chestxray.pipeline.common import run_stage
from chestxray.settings import load_config, load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--out", default="artifacts/evaluation")
    args = parser.parse_args(argv)
    run_stage(lambda: evaluate(load_params(args.params, "evaluate"), load_config(args.config), Path(args.data),
                               Path(args.model), Path(args.out)), Path(args.out))


def evaluate(params: dict, config: dict, data_dir: Path, model_dir: Path, out: Path) -> None:
    """Score the model; write metrics, thresholds, predictions, plots; log and register in MLflow."""
    import mlflow
    import numpy as np
    import pandas as pd

    from chestxray import tracking
    from chestxray.evaluation.metrics import classification_metrics, choose_threshold
    from chestxray.evaluation.plots import roc_table, save_figures, write_plot_data
    from chestxray.model.classifier import INFO_FILE, METRICS_FILE, THRESHOLDS_FILE, Classifier

    clf = Classifier.from_dirs(model_dir)
    classes, normal = clf.classes, clf.normal_class
    manifest = pd.read_csv(data_dir / "manifest.csv")
    rows = {s: manifest[manifest.split == s] for s in ("val", "test")}
    y = {s: np.array([classes.index(c) for c in r.label]) for s, r in rows.items()}
    probs = {s: clf.probabilities_for_files([str(data_dir / p) for p in r.path]) for s, r in rows.items()}

    threshold = choose_threshold(y["val"], probs["val"], classes, normal)  # validation only, never test
    val_metrics, _ = classification_metrics(y["val"], probs["val"], classes, normal, threshold, params["calibration_bins"])
    metrics, tables = classification_metrics(y["test"], probs["test"], classes, normal, threshold,
                                             params["calibration_bins"])
    metrics["val"] = {k: val_metrics[k] for k in ("accuracy", "roc_auc", "ece")}
    metrics["n_test"] = int(len(y["test"]))

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    thresholds = {"decision_threshold": threshold, "low_confidence": params["low_confidence"],
                  "chosen_on": "validation", "rule": "abnormal when 1 - P(normal) >= decision_threshold"}
    write_json(out / THRESHOLDS_FILE, thresholds)
    predictions = pd.DataFrame({"path": rows["test"].path.values, "label": rows["test"].label.values,
                                "predicted": [classes[k] for k in tables["predicted"]],
                                **{f"p_{c}": probs["test"][:, k] for k, c in enumerate(classes)}})
    with atomic_path(out / "predictions.csv") as temp:
        predictions.to_csv(temp, index=False)
    roc = roc_table(y["test"], probs["test"], classes, normal)
    write_plot_data(out / "plots", y["test"], tables["predicted"], classes, roc, tables["reliability"])
    figures = save_figures(out / "figures", tables["confusion"], classes, roc, tables["reliability"],
                           metrics["roc_auc"])
    print(f"test: accuracy {metrics['accuracy']:.4f}, ROC AUC {metrics['roc_auc']:.4f}, "
          f"sensitivity {metrics.get('sensitivity', float('nan')):.4f}, specificity "
          f"{metrics.get('specificity', float('nan')):.4f}, ECE {metrics['ece']:.4f} (threshold {threshold:.3f} from val)")

    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        flat = {k: v for k, v in tracking.flatten(metrics).items() if isinstance(v, (int, float)) and np.isfinite(v)}
        mlflow.log_metrics({f"test.{k}" if not k.startswith("val.") else k: v for k, v in flat.items()})
        mlflow.log_params(tracking.flatten({"evaluate": params}))
        for figure in figures:
            mlflow.log_artifact(str(figure), "figures")
        mlflow.log_artifact(str(out / "predictions.csv"), "evaluation")
        example = clf.prepare((data_dir / rows["test"].path.iloc[0]).read_bytes())[None]
        name = config["mlflow"]["registered_model"]
        version = tracking.log_model(clf.model, example, clf.probabilities(example),
                                     [model_dir / INFO_FILE, out / THRESHOLDS_FILE, out / METRICS_FILE], name)
        promoted = tracking.promote_if_better(name, version, "val_roc_auc", metrics["val"]["roc_auc"])
    print(f"registered {name} version {version}" + (" as champion" if promoted else " (champion unchanged)"))


if __name__ == "__main__":
    main()
