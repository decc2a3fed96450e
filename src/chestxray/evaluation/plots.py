"""Figures (PNG) for people and data files for `dvc plots show`."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from chestxray.model.decision import disease_score  # noqa: E402


def roc_table(y: np.ndarray, probs: np.ndarray, classes: list[str], normal_class: str | None) -> pd.DataFrame:
    """ROC points of the headline score (any disease vs normal, or each class one-vs-rest)."""
    frames = []
    if normal_class in classes:
        curves = {"any disease": (y != classes.index(normal_class), disease_score(probs, classes, normal_class))}
    else:
        curves = {c: (y == k, probs[:, k]) for k, c in enumerate(classes)}
    for name, (truth, score) in curves.items():
        fpr, tpr, _ = roc_curve(truth, score)
        frames.append(pd.DataFrame({"curve": name, "fpr": fpr, "tpr": tpr}))
    return pd.concat(frames, ignore_index=True)


def write_plot_data(out: Path, y, predicted, classes, roc: pd.DataFrame, reliability: list[dict]) -> None:
    """confusion.csv, roc.csv and calibration.csv under `out` (declared as plots in dvc.yaml)."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [classes[k] for k in y], "predicted": [classes[k] for k in predicted]}).to_csv(
        out / "confusion.csv", index=False)
    roc.round(6).to_csv(out / "roc.csv", index=False)
    pd.DataFrame(reliability).to_csv(out / "calibration.csv", index=False)


def save_figures(out: Path, confusion: list[list[int]], classes: list[str], roc: pd.DataFrame,
                 reliability: list[dict], auc: float) -> list[Path]:
    """confusion.png, roc.png and calibration.png (a reliability diagram); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "confusion.png", out / "roc.png", out / "calibration.png"]

    fig, ax = plt.subplots(figsize=(4.5, 4))
    matrix = np.array(confusion)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, curve in roc.groupby("curve"):
        ax.plot(curve.fpr, curve.tpr, label=name)
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (test), AUC {auc:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    table = pd.DataFrame(reliability)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    if len(table):
        ax.plot(table.confidence, table.accuracy, "o-", label="model")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram (test)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
