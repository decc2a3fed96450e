"""Stage 7, model_card: write artifacts/evaluation/model_card.md from what the earlier stages measured.

    python -m chestxray.pipeline.model_card --data artifacts/data --model artifacts/training \\
        --evaluation artifacts/evaluation --robustness artifacts/robustness --reference artifacts/reference

A stage of its own because the card holds evaluate's *and* robustness' results and a DVC output
belongs to one stage. The app serves the card at /model/card; it is also logged to the MLflow run
that train opened (`evaluation/model_card.md`), where a model loaded from the registry finds it.
reference/ood.json (the out-of-distribution check's figures) is included when it exists, and so
are, with --shortcuts, the measurements research/04_cross_source_tb.py writes: the default stage
passes its committed results (the script takes the better part of an hour on 2 cores, too long for
a stage, so it is re-run by hand after the recipe changes); the card always carries evaluate's own
source probe.
"""
from __future__ import annotations

import json
from pathlib import Path

from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config


# Written by research/04_cross_source_tb.py (a research script, not a stage).
SHORTCUTS = "research/results/04_cross_source_tb.json"


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__, tensorflow=False)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--evaluation", default="artifacts/evaluation")
    parser.add_argument("--robustness", default="artifacts/robustness")
    parser.add_argument("--reference", default="artifacts/reference")
    parser.add_argument("--xray-check", default="artifacts/xray_check", help="the xray_check stage's output")
    parser.add_argument("--shortcuts", default=None, help=f"research/04's JSON, e.g. {SHORTCUTS} (optional)")
    args = parser.parse_args(argv)
    run_stage(lambda: model_card(load_config(args.config), Path(args.data), Path(args.model), Path(args.evaluation),
                                 Path(args.robustness), Path(args.reference), args.shortcuts and Path(args.shortcuts),
                                 Path(args.xray_check)),
              Path(args.evaluation))


def _json(path: Path, required: bool = True) -> dict | None:
    if path.is_file():
        return json.loads(path.read_text())
    if required:
        raise FileNotFoundError(f"{path} not found -- run the stage that writes it first (`dvc repro`)")
    return None


def write_model_card(data_dir: Path, model_dir: Path, evaluation_dir: Path, robustness_dir: Path,
                     reference_dir: Path, shortcuts: Path | None = None, xray_check_dir: Path | None = None) -> Path:
    """Render the card from the stages' files into evaluation_dir/model_card.md; returns its path."""
    import pandas as pd

    from chestxray.evaluation.model_card import render_model_card
    from chestxray.hashing import file_sha256
    from chestxray.model.artifacts import (INFO_FILE, METRICS_FILE, MODEL_CARD_FILE, MODEL_FILE, THRESHOLDS_FILE,
                                           XRAY_CHECK_FILE)

    table_csv = robustness_dir / "table.csv"
    table = pd.read_csv(table_csv).to_dict("records") if table_csv.is_file() else None
    card = render_model_card(
        info=_json(model_dir / INFO_FILE), version="sha256:" + file_sha256(model_dir / MODEL_FILE)[:12],
        report=_json(data_dir / "report.json"), metrics=_json(evaluation_dir / METRICS_FILE),
        thresholds=_json(evaluation_dir / THRESHOLDS_FILE),
        robustness=_json(robustness_dir / "metrics.json", required=False), robustness_table=table,
        ood=_json(reference_dir / "ood.json", required=False),
        shortcuts=_json(shortcuts, required=False) if shortcuts is not None else None,
        xray_check=_json(xray_check_dir / XRAY_CHECK_FILE, required=False) if xray_check_dir is not None else None)
    path = evaluation_dir / MODEL_CARD_FILE
    path.write_text(card)
    return path


def model_card(config: dict, data_dir: Path, model_dir: Path, evaluation_dir: Path, robustness_dir: Path,
               reference_dir: Path, shortcuts: Path | None = None, xray_check_dir: Path | None = None) -> None:
    """Write the card and log it to the pipeline's MLflow run."""
    import mlflow

    from chestxray import tracking

    path = write_model_card(data_dir, model_dir, evaluation_dir, robustness_dir, reference_dir, shortcuts,
                            xray_check_dir)
    print(f"model card -> {path}")
    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        mlflow.log_artifact(str(path), "evaluation")


if __name__ == "__main__":
    main()
