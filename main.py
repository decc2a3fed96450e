"""Run the pipeline's stages in order without DVC (same commands, same default paths as dvc.yaml).

    python main.py            # all stages
    python main.py train evaluate

Prefer `dvc repro`: it skips stages whose inputs did not change.
"""
import sys

from chestxray.pipeline import evaluate, export, ingest, model_card, prepare_base_model, robustness, train

STAGES = {
    "ingest": ingest.main,
    "prepare_base_model": prepare_base_model.main,
    "train": train.main,
    "evaluate": evaluate.main,
    "export": export.main,
    "robustness": robustness.main,
    "model_card": model_card.main,
}


def run(names: list[str]) -> None:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGES)}")
    for name in names or list(STAGES):
        print(f">>> stage {name}", flush=True)
        STAGES[name]([])


if __name__ == "__main__":
    run(sys.argv[1:])
