# %% [markdown]
# # Tuberculosis or the hospital? Shortcut checks on tb256, with the project's own network code
# `python research/04_cross_source_tb.py [--out research/results/04_cross_source_tb.json]`
# Reads ../shared/data/tb256 (and kermany224/test for the source probe) by file name; needs no pipeline run.
# Activations are cached under --cache (/tmp by default) and reused; a second run takes minutes.
#
# 1. TB vs normal *within* each TB collection (held-out half, whole near-duplicate groups).
# 2. Source probe: pooled features -> collection (grouped 5-fold logistic regression).
# 3. TB *across* collections, both ways: fit on one collection's TB + normals, test on the other's
#    (its test half; images near-duplicating any training image are dropped). Models: the frozen
#    ImageNet Xception (whole, as the probe) + logistic regression; the pipeline's truncated
#    backbone + logistic regression; the pipeline's head (training.py) on it; and the head with the
#    top blocks fine-tuned.
# 4. Mitigations (chestxray.evaluation.shortcuts.MITIGATIONS), chosen on the *validation* half of the
#    other collection (mean cross-source AUC of the pipeline head, both ways); reported on the test half.

# %%
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from chestxray.evaluation import shortcuts as S
from chestxray.model import training as T
from chestxray.settings import load_params

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="../shared/data")
parser.add_argument("--cache", default="/tmp/chestxray-04")
parser.add_argument("--out", default="research/results/04_cross_source_tb.json")
parser.add_argument("--mitigations", default="none,reencode_jpeg75,equalise")
parser.add_argument("--fine-tune-epochs", type=int, default=2)
args = parser.parse_args()
cache = Path(args.cache)
cache.mkdir(parents=True, exist_ok=True)
params = load_params("params.yaml")
base, train = params["base_model"], params["train"]
TB, NORMAL, SEED = "TUBERCULOSIS", "NORMAL", 42
timings: dict[str, float] = {}

# %% The images, their collections and near-duplicate groups (across collections too).
tb = S.collection_table(Path(args.data) / "tb256")
kermany = pd.DataFrame([{"path": str(p), "label": p.parent.name, "collection": "kermany"}
                        for p in sorted((Path(args.data) / "kermany224" / "test").glob("*/*.jpeg"))])
table = pd.concat([tb, kermany], ignore_index=True)
started = time.perf_counter()
groups_file = cache / "groups.npy"
if not groups_file.is_file():
    np.save(groups_file, S.near_duplicate_groups(table.path.tolist()))
table["group"] = np.load(groups_file)
timings["near_duplicate_groups_s"] = time.perf_counter() - started
sizes = table.group.map(table.group.value_counts())
print(table.groupby(["collection", "label"]).size().to_string())
print(f"{int((sizes > 1).sum())} images have a near-duplicate; "
      f"{int(table.groupby('group').collection.nunique().gt(1).sum())} groups span two collections")

# %% Activations of the frozen bottom (cached), and pooled features: the pipeline's truncated
# backbone and the whole Xception (the probe) share the bottom, so one pass serves both.
trunc, whole = S.split_network(base, train["fine_tune_from"]), S.split_network(base, train["fine_tune_from"],
                                                                                 truncate=False)


def activations(name: str, rows: pd.DataFrame) -> np.ndarray:
    file = cache / f"bottom_{name}_{len(rows)}.npy"
    if not file.is_file():
        t = time.perf_counter()
        x = S.bottom_activations(trunc, rows.path.tolist(), base["image_size"], S.MITIGATIONS[name])
        np.save(file, x)
        timings[f"activations_{name}_s"] = time.perf_counter() - t
        print(f"activations {name}: {x.shape} in {timings[f'activations_{name}_s']:.0f} s", flush=True)
    return np.load(file, mmap_mode="r")


def pooled(split, x: np.ndarray) -> np.ndarray:
    T.set_fine_tuning(split, False)
    return T.run_in_batches(split.pooled, x, 64)


bottom = activations("none", table)
features = {"pipeline_backbone": pooled(trunc, bottom), "xception_whole": pooled(whole, bottom)}
results: dict = {"n_images": table.groupby(["collection", "label"]).size().rename("n").reset_index()
                 .to_dict("records"),
                 "near_duplicates": {"hash": "ingest's: phash 256 bit, linked at <= NEAR_DUPLICATE_DISTANCE",
                                     "images_with_a_near_duplicate": int((sizes > 1).sum()),
                                     "groups_spanning_collections":
                                         int(table.groupby("group").collection.nunique().gt(1).sum())}}

# %% 2. Source probe: which collection an image came from, from its features.
probe = {}
for name, f in features.items():
    probe[name] = {"all": S.source_probe(f, table.collection.values, table.group.values),
                   "normals_only": S.source_probe(f[(table.label == NORMAL).values],
                                                  table.collection[table.label == NORMAL].values,
                                                  table.group[table.label == NORMAL].values),
                   "tb_only": S.source_probe(f[(table.label == TB).values], table.collection[table.label == TB].values,
                                             table.group[table.label == TB].values)}
results["source_probe"] = probe
print(json.dumps(probe, indent=1))

# %% Held-out halves per TB collection (whole groups, stratified by class): "val" and "test".
collections = ["tb256/hospital", "tb256/public"]
rows = {c: np.flatnonzero((table.collection == c).values) for c in collections}
half = {c: S.grouped_halves((table.label.values[r] == TB).astype(int), table.group.values[r], SEED)
        for c, r in rows.items()}
y_all = (table.label.values == TB).astype(int)


def within(f: np.ndarray) -> dict:
    """1. TB vs normal inside one collection: fit on its val half, score its test half (probe)."""
    return {c: S.probe_auc(f[r[half[c]]], y_all[r[half[c]]], f[r[~half[c]]], y_all[r[~half[c]]])
            for c, r in rows.items()}


results["within_collection_probe_auc"] = {name: within(f) for name, f in features.items()}
print("within", results["within_collection_probe_auc"])


def target_sets(source: str, target: str) -> dict:
    """Indices of the target's val and test halves, minus images in a group that has a source image."""
    shared = set(table.group.values[rows[source]])
    keep = ~np.isin(table.group.values[rows[target]], list(shared))
    return {"val": rows[target][half[target] & keep], "test": rows[target][~half[target] & keep],
            "dropped_as_near_duplicates_of_train": int((~keep).sum())}


def head_split(source: str):
    """The source collection cut in train / early-stopping val (15% of its groups, stratified)."""
    from sklearn.model_selection import StratifiedGroupKFold

    r = rows[source]
    fit, stop = next(StratifiedGroupKFold(7, shuffle=True, random_state=SEED).split(r, y_all[r], table.group.values[r]))
    return r[fit], r[stop]


def cross(x: np.ndarray, feats: dict, methods: tuple[str, ...]) -> dict:
    """3. Cross-collection AUCs (val and test half of the target), both ways, for the given methods."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for source, target in [(collections[0], collections[1]), (collections[1], collections[0])]:
        sets = target_sets(source, target)
        entry = {"dropped_as_near_duplicates_of_train": sets["dropped_as_near_duplicates_of_train"],
                 "n_val": len(sets["val"]), "n_test": len(sets["test"])}
        for name in ("xception_whole", "pipeline_backbone"):
            if f"probe_{name}" in methods:
                f = feats[name]
                entry[f"probe_{name}"] = {s: S.probe_auc(f[rows[source]], y_all[rows[source]], f[sets[s]],
                                                         y_all[sets[s]]) for s in ("val", "test")}
        fit_rows, stop_rows = head_split(source)
        for epochs, key in ((0, "pipeline_head"), (args.fine_tune_epochs, "pipeline_head_fine_tuned")):
            if key not in methods or (key.endswith("tuned") and not epochs):
                continue
            t = time.perf_counter()
            split = S.split_network(base, train["fine_tune_from"])
            S.fit_head(split, x[fit_rows], y_all[fit_rows], x[stop_rows], y_all[stop_rows], train, epochs)
            entry[key] = {s: float(roc_auc_score(y_all[sets[s]], S.head_scores(split, x[sets[s]])))
                          for s in ("val", "test")}
            entry[key]["fit_s"] = time.perf_counter() - t
        out[f"{source} -> {target}"] = entry
        print(source, "->", target, json.dumps(entry), flush=True)
    return out


ALL = ("probe_xception_whole", "probe_pipeline_backbone", "pipeline_head", "pipeline_head_fine_tuned")
results["cross_collection_auc"] = {"none": cross(bottom, features, ALL)}

# %% 4. Mitigations: same images, preprocessed another way before the shared preprocessing.
tb_rows = np.concatenate([rows[c] for c in collections])
for name in [m for m in args.mitigations.split(",") if m != "none"]:
    part = activations(name, table.iloc[tb_rows])
    x = np.zeros((len(table), *bottom.shape[1:]), np.float16)  # only the TB collections' rows are filled
    x[tb_rows] = part
    f = np.zeros((len(table), features["pipeline_backbone"].shape[1]), np.float32)
    f[tb_rows] = pooled(trunc, part)
    feats = {"pipeline_backbone": f}
    results["cross_collection_auc"][name] = cross(x, feats, ("probe_pipeline_backbone", "pipeline_head"))


def val_score(entry: dict) -> float:
    return float(np.mean([e["pipeline_head"]["val"] for e in entry.values()]))


choice = {name: val_score(entry) for name, entry in results["cross_collection_auc"].items()}
chosen = max(choice, key=choice.get)
results["mitigation"] = {"chosen_on": "mean cross-collection ROC AUC of the pipeline head on the target's "
                                      "validation half, both directions", "val_auc": choice, "chosen": chosen,
                         "test_auc_before": {k: v["pipeline_head"]["test"]
                                             for k, v in results["cross_collection_auc"]["none"].items()},
                         "test_auc_after": {k: v["pipeline_head"]["test"]
                                            for k, v in results["cross_collection_auc"][chosen].items()}}
results["timings_s"] = timings
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps(results["mitigation"], indent=1))
print(f"-> {out}")
