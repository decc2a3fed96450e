"""Stage 6, robustness: the served model on corrupted test images, and with test-time augmentation.

    python -m chestxray.pipeline.robustness --data artifacts/data --model artifacts/training \\
        --evaluation artifacts/evaluation --export artifacts/export --out artifacts/robustness

On a stratified, seeded subset of the test split (`robustness.max_images`), each image decoded once:
accuracy, ROC AUC, ECE, sensitivity and specificity of the served probabilities (temperature and
thresholds from evaluate) on the clean images, with TTA, and under each corruption of
chestxray.evaluation.corruptions at two severities, with the drop against clean and a paired 95%
interval for the accuracy drop. Writes metrics.json (DVC metrics) and table.csv (DVC plot); logs both
to the MLflow run that train opened. ONNX Runtime computes the probabilities when the export exists.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config, load_params

METRICS = ("accuracy", "roc_auc", "ece", "sensitivity", "specificity")


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--evaluation", default="artifacts/evaluation")
    parser.add_argument("--export", default="artifacts/export")
    parser.add_argument("--out", default="artifacts/robustness")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    run_stage(lambda: robustness({**params["robustness"], "calibration_bins": params["evaluate"]["calibration_bins"]},
                                 load_config(args.config), Path(args.data), Path(args.model), Path(args.evaluation),
                                 Path(args.export), Path(args.out)), Path(args.out))


def score(predictor, y: np.ndarray, probs: np.ndarray, bins: int) -> tuple[dict, np.ndarray]:
    """(the METRICS of served probabilities, per-image correctness) under the model's decision threshold."""
    from chestxray.evaluation.metrics import classification_metrics

    if len(np.unique(y)) < 2:  # ROC AUC (and the drops against clean) need both classes
        raise ValueError("the robustness subset holds one class only -- raise robustness.max_images")
    metrics, tables = classification_metrics(y, probs, predictor.classes, predictor.normal_class,
                                             predictor.calibration.decision_threshold, bins)
    return {k: metrics[k] for k in METRICS if k in metrics}, tables["predicted"] == y


def drop_row(variant: dict, clean: dict, correct: np.ndarray, clean_correct: np.ndarray) -> dict:
    """Drops against clean (positive = worse), with a paired normal-approximation 95% interval on accuracy."""
    diff = clean_correct.astype(float) - correct.astype(float)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {"accuracy_drop": clean["accuracy"] - variant["accuracy"], "accuracy_drop_ci95_low": diff.mean() - half,
            "accuracy_drop_ci95_high": diff.mean() + half, "roc_auc_drop": clean["roc_auc"] - variant["roc_auc"],
            "ece_change": variant["ece"] - clean["ece"]}


def robustness_table(predictor, grays: list[np.ndarray], y: np.ndarray, seed: int, bins: int) -> "pd.DataFrame":
    """One row per setting: clean, clean + TTA, and every corruption at both severities."""
    import pandas as pd

    from chestxray.data.preprocess import prepare_image
    from chestxray.evaluation.corruptions import CORRUPTIONS, corrupt

    def inputs(name: str | None = None, severity: int = 0) -> np.ndarray:
        # One generator per image, equal across severities: the same direction and noise pattern, scaled.
        images = grays if name is None else [corrupt(g, name, severity, np.random.default_rng([seed, i]))
                                             for i, g in enumerate(grays)]
        return np.stack([prepare_image(g, predictor.image_size) for g in images])

    def served(x: np.ndarray, tta: bool = False) -> np.ndarray:
        return predictor.served_probabilities(x, tta=tta)

    clean_x = inputs()
    clean, clean_correct = score(predictor, y, served(clean_x), bins)
    tta, tta_correct = score(predictor, y, served(clean_x, tta=True), bins)
    rows = [{"variant": "clean", "corruption": "none", "severity": 0, "setting": "as acquired", **clean},
            {"variant": "clean_tta", "corruption": "none (TTA)", "severity": 0, "setting": "flip + 2 shifts",
             **tta, **drop_row(tta, clean, tta_correct, clean_correct)}]
    for name, (_, values) in CORRUPTIONS.items():
        for severity, value in enumerate(values, start=1):
            metrics, correct = score(predictor, y, served(inputs(name, severity)), bins)
            rows.append({"variant": f"{name}_s{severity}", "corruption": name, "severity": severity,
                         "setting": f"{value:g}", **metrics, **drop_row(metrics, clean, correct, clean_correct)})
    return pd.DataFrame(rows)


def summary(table, n_images: int, n_test: int, backend: str) -> dict:
    """metrics.json: every row's scores, and the worst accuracy and ROC AUC drops among the corruptions."""
    import pandas as pd

    corrupted = table[table.severity > 0]
    acc, auc = (corrupted.loc[corrupted[m].idxmax()] for m in ("accuracy_drop", "roc_auc_drop"))
    worst = {"worst_accuracy_drop": {"variant": acc.variant, "drop": float(acc.accuracy_drop),
                                     "ci95": [float(acc.accuracy_drop_ci95_low), float(acc.accuracy_drop_ci95_high)]},
             "worst_roc_auc_drop": {"variant": auc.variant, "drop": float(auc.roc_auc_drop)}}
    variants = {r["variant"]: {k: float(v) for k, v in r.items()
                               if (k in METRICS or k.endswith(("_drop", "_change"))) and pd.notna(v)}
                for r in table.to_dict("records")}
    return {"n_images": n_images, "n_test": n_test, "backend": backend, **worst, "variants": variants}


def robustness(params: dict, config: dict, data_dir: Path, model_dir: Path, evaluation_dir: Path,
               export_dir: Path, out: Path) -> None:
    """Score the served model under corruptions and TTA; write metrics.json and table.csv; log to MLflow."""
    import mlflow
    import pandas as pd

    from chestxray import tracking
    from chestxray.data.preprocess import decode_image
    from chestxray.data.split import stratified_subset
    from chestxray.model.artifacts import ONNX_FILE, THRESHOLDS_FILE, ModelFiles
    from chestxray.model.predictor import Predictor

    started = time.perf_counter()
    if not (evaluation_dir / THRESHOLDS_FILE).is_file():
        raise FileNotFoundError(f"no {evaluation_dir / THRESHOLDS_FILE} -- run the evaluate stage first")
    predictor = Predictor.load(ModelFiles(model_dir, evaluation_dir, export_dir / ONNX_FILE), backend="auto")
    manifest = pd.read_csv(data_dir / "manifest.csv")
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    labels = np.array([predictor.classes.index(c) for c in test.label])
    chosen = stratified_subset(labels, int(params["max_images"]), int(params["seed"]))
    grays = [decode_image((data_dir / test.path[i]).read_bytes()) for i in chosen]  # decoded once, kept in memory
    table = robustness_table(predictor, grays, labels[chosen], int(params["seed"]), int(params["calibration_bins"]))

    out.mkdir(parents=True, exist_ok=True)
    table.round(6).to_csv(out / "table.csv", index=False)
    metrics = summary(table, len(chosen), len(test), predictor.backend)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    worst = metrics["worst_accuracy_drop"]
    print(table[["variant", "accuracy", "roc_auc", "ece", "accuracy_drop"]].to_string(index=False, float_format="%.4f"))
    print(f"{len(chosen)} of {len(test)} test images, {predictor.backend}: worst accuracy drop {worst['drop']:.4f} "
          f"({worst['variant']}, 95% CI {worst['ci95'][0]:.4f} to {worst['ci95'][1]:.4f}); "
          f"{time.perf_counter() - started:.0f} s")
    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        mlflow.log_metrics({f"robustness.{variant}.{k}": v for variant, scores in metrics["variants"].items()
                            for k, v in scores.items()})
        mlflow.log_metrics({"robustness.worst_accuracy_drop": worst["drop"],
                            "robustness.worst_roc_auc_drop": metrics["worst_roc_auc_drop"]["drop"]})
        # Tags, not params: changing robustness.* reruns this stage alone, into the same run.
        mlflow.set_tags(tracking.flatten({"robustness": params}))
        mlflow.log_artifact(str(out / "table.csv"), "robustness")
        mlflow.log_artifact(str(out / "metrics.json"), "robustness")


if __name__ == "__main__":
    main()
