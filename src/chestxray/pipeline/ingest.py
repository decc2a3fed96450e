"""Stage 1, ingest: fetch the images, validate them, split them by patient, and write a manifest.

    python -m chestxray.pipeline.ingest --params params.yaml --out artifacts/data

Writes <out>/images/<split>/<class>/<file>, <out>/manifest.csv and <out>/report.json. The classes are
the source's folder names. Validation is carved from train by patient; train images of patients who
also appear in the official test split are dropped (data.patient_overlap: drop), and exact duplicate
files never sit in two splits. The output appears only when the whole run succeeded.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chestxray.atomic import leftover_name, remove_dead_leftovers
from chestxray.data.sources import DataSourceError, fetch, split_folders
from chestxray.data.split import patient_classes, patient_id, split_patients
from chestxray.data.validate import validate_bytes
from chestxray.pipeline.common import run_stage
from chestxray.settings import load_params

SPLIT_ORDER = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "split", "patient", "width", "height", "sha256"]
OVERLAP_POLICIES = ("drop", "keep")


@dataclass
class Item:
    """One accepted image on its way through the stage."""

    file: str  # relative to the dataset root, e.g. "train/NORMAL/IM-0115-0001.jpeg"
    label: str
    origin: str  # the source's split folder: "train", "val", "test", or "" when the source has none
    patient: str
    width: int
    height: int
    sha256: str
    staged: Path  # its bytes, written while it was validated
    split: str = ""


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(root: Path) -> tuple[list[str], list[tuple[Path, str, str]], list[Path]]:
    """Class names (sorted), then (file, class, origin split) for every file in a class folder, and stray files."""
    classes: set[str] = set()
    files, stray = [], []
    for origin, folder in split_folders(root).items():
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                continue
            if entry.is_file():
                stray.append(entry)
                continue
            classes.add(entry.name)
            inside = sorted(f for f in entry.rglob("*") if f.is_file() and not _is_hidden(f, entry))
            files += [(f, entry.name, origin) for f in inside]
    return sorted(classes), files, stray


def read_images(root: Path, files: list[tuple[Path, str, str]], stray: list[Path], min_size: int,
                staging: Path) -> tuple[list[Item], list[dict[str, str]]]:
    """Validate every file and return (accepted, rejected).

    Each file is read once: the same bytes are validated, hashed and written to `staging`.
    """
    staging.mkdir(parents=True)
    items = []
    rejected = [{"file": f.relative_to(root).as_posix(), "reason": "not inside a class folder"} for f in stray]
    for index, (path, label, origin) in enumerate(files):
        relative = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            reason = f"cannot read file ({exc.strerror or exc.__class__.__name__})"
            rejected.append({"file": relative, "reason": reason})
            continue
        check = validate_bytes(data, min_size)
        if not check.ok:
            rejected.append({"file": relative, "reason": check.reason})
            continue
        staged = staging / str(index)
        staged.write_bytes(data)
        items.append(Item(relative, label, origin, patient_id(path.name), check.width, check.height,
                          hashlib.sha256(data).hexdigest(), staged))
    return items, sorted(rejected, key=lambda r: r["file"])


def drop_patient_overlap(items: list[Item], policy: str) -> tuple[list[Item], dict[str, Any]]:
    """Handle train images of patients who are also in the official test split; report what was done."""
    test_patients = {i.patient for i in items if i.origin == "test"}
    shared = {i.patient for i in items if i.origin != "test"} & test_patients
    dropped = [i for i in items if i.origin != "test" and i.patient in shared] if policy == "drop" else []
    kept = [i for i in items if not (policy == "drop" and i.origin != "test" and i.patient in shared)]
    return kept, {"policy": policy, "patients": len(shared), "images_dropped": len(dropped)}


def assign_splits(items: list[Item], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Set `split` on every item: the official test split stays test; the rest is split by patient."""
    pool = [i for i in items if i.origin != "test"]
    has_test = len(pool) < len(items)
    patients = patient_classes([i.patient for i in pool], [i.label for i in pool])
    split_of = split_patients(patients, val_fraction, seed, None if has_test else test_fraction)
    for item in items:
        item.split = "test" if item.origin == "test" else split_of[item.patient]


def drop_duplicates(items: list[Item]) -> tuple[list[Item], dict[str, list[dict[str, str]]]]:
    """Keep one copy of each exact duplicate file and report the others.

    The copy kept is the test one if any, else val, else train; within a split, the first by path.
    Duplicates inside the official test split are reported but kept: that split is the published
    benchmark and must stay exactly as released.
    """
    priority = {"test": 0, "val": 1, "train": 2}
    by_digest: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_digest[item.sha256].append(item)
    report: dict[str, list[dict[str, str]]] = {"within_split": [], "across_splits": []}
    dropped: set[int] = set()
    for group in by_digest.values():
        keep, *rest = sorted(group, key=lambda i: (priority[i.split], i.file))
        for item in rest:
            kind = "within_split" if item.split == keep.split else "across_splits"
            kept = item.split == "test"
            report[kind].append({"file": item.file, "split": item.split, "duplicate_of": keep.file,
                                 "duplicate_split": keep.split, "sha256": item.sha256,
                                 "action": "kept (official test split)" if kept else "dropped"})
            if not kept:
                dropped.add(id(item))
    for entries in report.values():
        entries.sort(key=lambda e: e["file"])
    return [i for i in items if id(i) not in dropped], report


def write_images(items: list[Item], out: Path) -> list[dict[str, Any]]:
    """Move the staged bytes to out/images/<split>/<class>/<name>; return the manifest rows, sorted."""
    used: set[str] = set()
    rows = []
    for item in sorted(items, key=lambda i: (i.split, i.label, i.file)):
        name = Path(item.file).name
        relative = f"images/{item.split}/{item.label}/{name}"
        counter = 1
        while relative in used:  # same name from two source folders (e.g. train/ and val/)
            counter += 1
            relative = f"images/{item.split}/{item.label}/{Path(name).stem}-{counter}{Path(name).suffix}"
        used.add(relative)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(item.staged, out / relative)
        rows.append({"path": relative, "label": item.label, "split": item.split, "patient": item.patient,
                     "width": item.width, "height": item.height, "sha256": item.sha256})
    return sorted(rows, key=lambda r: (r["split"], r["label"], r["path"]))


def write_manifest(rows: list[dict[str, Any]], path: Path) -> str:
    """Write manifest.csv and return its sha256 (a digest of the sorted rows: `sha256sum manifest.csv`)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_params(data: dict[str, Any]) -> None:
    if data.get("patient_overlap", "drop") not in OVERLAP_POLICIES:
        raise ValueError(f"data.patient_overlap is {data['patient_overlap']!r}: set it in params.yaml to drop or keep")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= float(data.get(key, 0)) < 1:
            raise ValueError(f"data.{key} is {data[key]}: set it in params.yaml to a number in [0, 1)")


def ingest(data: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the stage with the `data:` params; write everything under `out` and return the report."""
    _check_params(data)
    source, policy, seed = str(data["source"] or ""), data.get("patient_overlap", "drop"), int(data["seed"])
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out` (same disk: moves, not copies), named after this process: a killed run's is removed here.
    remove_dead_leftovers(out.parent, f".{out.name}")
    work = out.parent / leftover_name(f".{out.name}")
    work.mkdir()
    try:
        root = fetch(source, work / "fetch", data.get("checksum"))
        classes, files, stray = scan(root)
        if len(classes) < 2:
            raise DataSourceError(f"data.source {source} holds {len(classes)} class folder(s) and a classifier needs "
                                  "at least 2: point data.source at the folder above the class folders")
        items, rejected = read_images(root, files, stray, int(data["min_size"]), work / "staged")
        if not any(i.origin != "test" for i in items):
            raise DataSourceError(f"data.source {source} has no usable training images: point data.source at a "
                                  "dataset with a train split or class folders")
        items, overlap = drop_patient_overlap(items, policy)
        assign_splits(items, float(data["val_fraction"]), float(data.get("test_fraction", 0)), seed)
        items, duplicates = drop_duplicates(items)
        result = work / "out"
        rows = write_images(items, result)
        digest = write_manifest(rows, result / "manifest.csv")
        counts = {s: {c: 0 for c in classes} for s in SPLIT_ORDER}
        for row in rows:
            counts[row["split"]][row["label"]] += 1
        report = {"classes": classes, "counts": counts, "rejected": rejected, "duplicates": duplicates,
                  "patient_overlap": overlap, "source": source, "dataset_sha256": digest, "seed": seed}
        (result / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(result, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(report: dict[str, Any], out: Path) -> str:
    """A few lines for the terminal: images per split and class, and what was left out."""
    lines = [f"{split:<5} " + "  ".join(f"{c} {n:,}" for c, n in counts.items()) + f"  (total {sum(counts.values()):,})"
             for split, counts in report["counts"].items()]
    dup, overlap = report["duplicates"], report["patient_overlap"]
    dropped = {kind: sum(d["action"] == "dropped" for d in found) for kind, found in dup.items()}
    lines.append(f"rejected {len(report['rejected'])}; duplicates dropped {dropped['within_split']} within and "
                 f"{dropped['across_splits']} across splits; patient overlap with test: "
                 f"{overlap['patients']} patients, {overlap['images_dropped']} train images dropped "
                 f"({overlap['policy']})")
    lines.append(f"wrote {out}/manifest.csv and {out}/report.json (dataset sha256 {report['dataset_sha256'][:12]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/data")
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_stage(lambda: print(summary(ingest(load_params(args.params)["data"], out), out)), out)


if __name__ == "__main__":
    main()
