"""Stage 8, register: register the model with its export and reference, and move `champion` only on a clear gain.

    python -m chestxray.pipeline.register --data artifacts/data --model artifacts/training \\
        --evaluation artifacts/evaluation --export artifacts/export --reference artifacts/reference \\
        --out artifacts/registry

Runs last, so that a registered version always has its ONNX export, its "not a chest X-ray"
reference and its model card in its run. Logs the Keras model (signature, input example,
model_info.json, thresholds.json, metrics.json) plus export/model.onnx and reference/ to the MLflow
run that train opened, and registers a version. The version becomes `champion` when there is no
champion, or when its validation log-loss (evaluate's metrics.json, calibrated probabilities) is
lower than the champion's by at least `register.promote_margin` (tracking.promotion_decision;
docs/tracking.md). `chestxray promote VERSION` overrides by hand. Writes registered.json: the
version, whether it was promoted and why, both log-losses.
"""
from __future__ import annotations

import json
from pathlib import Path

from chestxray.atomic import write_json
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config, load_params

REGISTERED_FILE = "registered.json"


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--evaluation", default="artifacts/evaluation")
    parser.add_argument("--export", default="artifacts/export")
    parser.add_argument("--reference", default="artifacts/reference")
    parser.add_argument("--xray-check", default="artifacts/xray_check", help="the xray_check stage's detector")
    parser.add_argument("--out", default="artifacts/registry")
    args = parser.parse_args(argv)
    run_stage(lambda: register(load_params(args.params, "register"), load_config(args.config), Path(args.data),
                               Path(args.model), Path(args.evaluation), Path(args.export), Path(args.reference),
                               Path(args.out), Path(args.xray_check)), Path(args.out))


def _required(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found -- run the {stage} stage first (`dvc repro`)")
    return path


def register(params: dict, config: dict, data_dir: Path, model_dir: Path, evaluation_dir: Path, export_dir: Path,
             reference_dir: Path, out: Path, xray_check_dir: Path | None = None) -> dict:
    """Log and register the model with its export and reference; promote by the rule; write registered.json."""
    import mlflow
    import pandas as pd

    from chestxray import tracking
    from chestxray.model.artifacts import (INFO_FILE, METRICS_FILE, MODEL_CARD_FILE, ONNX_FILE, THRESHOLDS_FILE,
                                           XRAY_CHECK_DIR, ModelFiles)
    from chestxray.model.ood import OOD_FILE, REFERENCE_FILE
    from chestxray.model.predictor import Predictor
    from chestxray.model.xray_detector import DETECTOR_FILE

    margin = float(params["promote_margin"])
    metrics = json.loads(_required(evaluation_dir / METRICS_FILE, "evaluate").read_text())
    log_loss = (metrics.get("val") or {}).get("log_loss")
    if log_loss is None:
        raise ValueError(f"{evaluation_dir / METRICS_FILE} has no val.log_loss -- run the evaluate stage again")
    thresholds = _required(evaluation_dir / THRESHOLDS_FILE, "evaluate")
    onnx = _required(export_dir / ONNX_FILE, "export")
    references = [_required(reference_dir / f, "reference") for f in (OOD_FILE, REFERENCE_FILE)]
    card = evaluation_dir / MODEL_CARD_FILE
    # The "not a chest X-ray" detector is the classifier's companion, not part of it: served together.
    detector = _required(xray_check_dir / DETECTOR_FILE, "xray_check") if xray_check_dir is not None else None

    predictor = Predictor.load(ModelFiles(model_dir), backend="keras")
    manifest = pd.read_csv(data_dir / "manifest.csv")
    example_path = manifest[manifest.split == "test"].path.iloc[0] if (manifest.split == "test").any() \
        else manifest.path.iloc[0]
    example = predictor.prepare((data_dir / example_path).read_bytes())[None]
    name = config["mlflow"]["registered_model"]
    with tracking.resume_run(config, model_dir / "mlflow_run.json") as run:
        # The registered version's run holds exactly the files it was registered with (the app downloads them).
        mlflow.log_artifact(str(onnx), "export")
        for path in references:
            mlflow.log_artifact(str(path), "reference")
        if card.is_file():
            mlflow.log_artifact(str(card), "evaluation")
        if detector is not None:
            mlflow.log_artifact(str(detector), XRAY_CHECK_DIR)
        # The registered Keras model outputs raw probabilities; the temperature travels in thresholds.json.
        version = tracking.log_model(predictor.model, example, predictor.raw_probabilities(example),
                                     [model_dir / INFO_FILE, thresholds, evaluation_dir / METRICS_FILE], name,
                                     keras_sha256=predictor.keras_sha256)
        outcome = tracking.promote_if_lower_log_loss(name, version, log_loss, margin)
        run_id = run.info.run_id
    record = {"name": name, "version": version, "run_id": run_id, "promoted": outcome["promoted"],
              "reason": outcome["reason"], "val_log_loss": float(log_loss),
              "champion_before": outcome["champion_before"],
              "champion_val_log_loss": outcome["champion_val_log_loss"], "promote_margin": margin}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / REGISTERED_FILE, record)
    print(f"registered {name} version {version}: " + ("champion" if outcome["promoted"] else "champion unchanged")
          + f" ({outcome['reason']})")
    return record


if __name__ == "__main__":
    main()
