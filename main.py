"""Run the pipeline's stages in order without DVC (same commands, same default paths as dvc.yaml).

    python main.py            # all stages
    python main.py train evaluate

Prefer `dvc repro`: it skips stages whose inputs did not change. One run at a time: while this runs,
another `python main.py` or a `dvc repro` in the same folder is refused (see chestxray.pipeline.lock).
"""
import sys

from chestxray.pipeline import (evaluate, export, ingest, model_card, prepare_base_model, reference, register,
                                robustness, train)
from chestxray.pipeline.lock import PipelineBusy, whole_run_lock

STAGES = {
    "ingest": ingest.main,
    "prepare_base_model": prepare_base_model.main,
    "train": train.main,
    "evaluate": evaluate.main,
    "reference": reference.main,
    "export": export.main,
    "robustness": robustness.main,
    "model_card": model_card.main,
    "register": register.main,
}


def run(names: list[str]) -> None:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGES)}")
    try:
        with whole_run_lock():
            for name in names or list(STAGES):
                print(f">>> stage {name}", flush=True)
                STAGES[name]([])
    except PipelineBusy as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    run(sys.argv[1:])
