"""Stage 2, prepare_base_model: build the classifier from base_model.* params and save it untrained.

    python -m chestxray.pipeline.prepare_base_model --data artifacts/data --out artifacts/base_model
"""
from __future__ import annotations

import json
from pathlib import Path

from chestxray.atomic import atomic_path, write_json
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_params


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/data", help="ingest output (its report.json names the classes)")
    parser.add_argument("--out", default="artifacts/base_model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_stage(lambda: prepare(load_params(args.params, "base_model"), Path(args.data), out), out)


def prepare(params: dict, data_dir: Path, out: Path) -> None:
    """Build the backbone + head for the classes found by ingest and save it as .keras with a summary."""
    from chestxray.model.backbones import resolve
    from chestxray.model.build import build_model

    classes = json.loads((data_dir / "report.json").read_text())["classes"]
    truncate_before, _ = resolve(params["backbone"], params.get("truncate_before", "auto"), "auto")
    model = build_model(params["backbone"], params["image_size"], len(classes), params["weights"],
                        params["dropout"], params["dense_units"], truncate_before)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "base_model.keras") as temp:
        model.save(temp)
    summary = {"backbone": params["backbone"], "image_size": params["image_size"], "classes": classes,
               "weights": str(params["weights"]), "truncate_before": truncate_before,
               "parameters": int(model.count_params())}
    write_json(out / "summary.json", summary)
    print(f"{params['backbone']} at {params['image_size']} px for {len(classes)} classes: "
          f"{summary['parameters']:,} parameters -> {out / 'base_model.keras'}")


if __name__ == "__main__":
    main()
