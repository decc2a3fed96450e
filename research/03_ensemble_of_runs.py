# %% [markdown]
# # Would averaging several training runs close the val/test gap?
# Runs as a script: `python research/03_ensemble_of_runs.py artifacts/training OTHER/training [...]`,
# each argument the training output of one `dvc repro` on the same data (same `data.seed`, so the
# same validation split; another `train.seed` makes another run). Needs `artifacts/data` here.
#
# Deep ensembles are the usual answer to over-confidence under dataset shift (Ovadia et al. 2019).
# The ensemble averages the runs' probabilities; the temperature, the decision threshold and the
# low-confidence threshold are then chosen on validation by the evaluate stage's own code, and the
# test split is only scored. Measured (2026-11-29; three runs, train.seed 42, 42 and 43): alone,
# test accuracy 0.897 / 0.901 / 0.904 and ROC AUC 0.969 / 0.969 / 0.971; their average 0.902 and
# 0.970 (ECE 0.096); pairs 0.901-0.904. Runs fine-tuned from the same backbone on the same data make
# the same mistakes.

# %%
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from chestxray.model.artifacts import ModelFiles
from chestxray.model.predictor import Predictor
from chestxray.pipeline.evaluate import fit_on_validation, score
from chestxray.settings import load_params

DATA = Path("artifacts/data")
PARAMS = load_params("params.yaml", "evaluate")  # the evaluate stage's own settings
runs = [Path(arg) for arg in sys.argv[1:]] or [Path("artifacts/training")]
manifest = pd.read_csv(DATA / "manifest.csv")
rows = {s: manifest[manifest.split == s] for s in ("val", "test")}

# %% Each run's own probabilities on validation and test (no temperature), through the shared preprocessing.
raw, names = [], []
for run in runs:
    clf = Predictor.load(ModelFiles(run), backend="keras")
    raw.append({s: clf.served_probabilities_for_files([str(DATA / p) for p in r.path]) for s, r in rows.items()})
    names.append(clf.version)
classes, normal = clf.classes, clf.normal_class
y = {s: np.array([classes.index(c) for c in r.label]) for s, r in rows.items()}


# %% One line per run and per average of runs: the same rules as the evaluate stage.
def scored(members: tuple[int, ...]) -> str:
    mean = {s: np.mean([raw[k][s] for k in members], axis=0) for s in y}
    thresholds, probs = fit_on_validation(PARAMS, y, mean, classes, normal)
    m, _ = score(PARAMS, y, mean, probs, classes, normal, thresholds)
    return (f"test accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.4f}, ECE {m['ece']:.3f}, specificity "
            f"{m.get('specificity', float('nan')):.3f} (T {thresholds['temperature']:.2f}, threshold "
            f"{thresholds['decision_threshold']:.3f}; val accuracy {m['val']['accuracy']:.3f})")


for n in range(1, len(runs) + 1):
    for members in combinations(range(len(runs)), n):
        print(" + ".join(names[k] for k in members) + ":", scored(members))
