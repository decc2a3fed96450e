# %% [markdown]
# # Data exploration
# Runs as a script (`python research/01_data_exploration.py`) or cell by cell in Jupyter/VS Code.
# It reads what the ingest stage wrote (`dvc repro ingest` first) and saves a figure next to it.

# %%
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from chestxray.data.preprocess import load_image

DATA = Path("artifacts/data")
manifest = pd.read_csv(DATA / "manifest.csv")
report = json.loads((DATA / "report.json").read_text())

# %% Class balance per split: pneumonia outnumbers normal about 3:1, hence class weights in training.
counts = manifest.pivot_table(index="split", columns="label", values="path", aggfunc="count")
print(counts, "\n")
print("share of the majority class in test (accuracy of always guessing it):",
      round(counts.loc["test"].max() / counts.loc["test"].sum(), 3))

# %% Patients: several images per patient, none shared between splits.
per_patient = manifest.groupby(["split", "patient"]).size()
print("\nimages per patient (mean by split):\n", per_patient.groupby(level=0).mean().round(2))
shared = set(manifest[manifest.split == "train"].patient) & set(manifest[manifest.split != "train"].patient)
print("patients in train and another split:", len(shared))
print("patient overlap with the official test split:", report.get("patient_overlap"))
print("rejected files:", len(report.get("rejected", [])))

# %% Image sizes as stored (the Kermany copies are all 224x224).
print("\nwidth x height:", manifest.groupby(["width", "height"]).size().sort_values(ascending=False).head())

# %% A few images per class, exactly as the model sees them (the shared preprocessing).
fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
for row, (label, group) in zip(axes, manifest[manifest.split == "train"].groupby("label")):
    for ax, path in zip(row, group.sample(4, random_state=0).path):
        ax.imshow(load_image(DATA / path, 224)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
fig.tight_layout()
out = DATA.parent / "research" / "samples.png"
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=100)
print("\nsaved", out)
