"""Stage 1, ingest: fetch every source, validate the images, group near-duplicates, split by group, write a manifest.

    python -m chestxray.pipeline.ingest --params params.yaml --out artifacts/data

Writes <out>/images/<split>/<class>/<file>, <out>/manifest.csv and <out>/report.json. The sources
(data.sources) are merged by class folder name; each image keeps its source, collection and group.
A group joins the images of one patient and near-duplicate images (perceptual hash, within and
across sources) and is never split. A source's official test split stays as released; validation
(and, for a source without a test split, test) is carved by group, stratified by class and
collection. Train images of patients in an official test split are dropped (data.patient_overlap:
drop), and copies of official test images are always dropped. The output appears only when the
whole run succeeded. See docs/data.md.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.atomic import leftover_name, remove_dead_leftovers
from chestxray.data.duplicates import NEAR_DUPLICATE_DISTANCE, connected_groups, near_pairs, perceptual_hash
from chestxray.data.sources import DataSourceError, fetch_first, split_folders
from chestxray.data.split import patient_classes, patient_id, split_patients
from chestxray.data.validate import validate_image
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_params

SPLIT_ORDER = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "split", "patient", "width", "height", "sha256", "source", "collection", "group"]
OVERLAP_POLICIES = ("drop", "keep")
LEGACY_NAME = "data"  # the source name of the older single data.source (the same wherever its files come from)


@dataclass
class Source:
    """One entry of data.sources: a short name, its locations in order of preference, optional collections."""

    name: str
    locations: list[str]
    collections: dict[str, str]
    checksum: str | None = None


@dataclass
class Item:
    """One accepted image on its way through the stage."""

    file: str  # relative to its source's dataset root, e.g. "train/NORMAL/IM-0115-0001.jpeg"
    label: str
    origin: str  # the source's split folder: "train", "val", "test", or "" when the source has none
    patient: str
    width: int
    height: int
    sha256: str
    staged: Path  # its bytes, written while it was validated
    source: str = ""
    collection: str = ""
    phash: np.ndarray | None = None
    split: str = ""
    group: str = ""


def read_sources(data: dict[str, Any]) -> list[Source]:
    """The sources of the `data:` params: data.sources, or the older single data.source (+ data.checksum).

    A non-empty data.source wins (`dvc exp run -S data.source=path/to/kermany224` gives a
    one-source run); the summary says that data.sources was left aside.
    """
    if data.get("source") or not data.get("sources"):
        location = str(data.get("source") or "")
        return [Source(LEGACY_NAME, [location], {}, data.get("checksum"))]
    sources = []
    for number, entry in enumerate(data["sources"]):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("location"):
            raise ValueError(f"data.sources[{number}] needs a name and a location: set it in params.yaml as "
                             "{name: ..., location: <folder, archive, URL or a list of them>}")
        locations = entry["location"] if isinstance(entry["location"], list) else [entry["location"]]
        collections = dict(entry.get("collections") or {})
        for collection, pattern in collections.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"data.sources[{entry['name']}].collections.{collection} is not a valid regular "
                                 f"expression ({exc}): fix it in params.yaml") from None
        sources.append(Source(str(entry["name"]), [str(loc) for loc in locations], collections,
                              entry.get("checksum")))
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        raise ValueError(f"data.sources has the same name twice ({', '.join(names)}): give each source its own name")
    if "/" in "".join(names):
        raise ValueError("a name in data.sources contains '/': use a short name without it")
    return sources


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


def collection_of(source: Source, filename: str) -> str:
    """'<source>/<collection>' for the first collection whose pattern matches the file name, else '<source>'."""
    for collection, pattern in source.collections.items():
        if re.search(pattern, filename):
            return f"{source.name}/{collection}"
    return source.name


def read_images(root: Path, files: list[tuple[Path, str, str]], stray: list[Path], min_size: int,
                staging: Path, source: Source | None = None) -> tuple[list[Item], list[dict[str, str]]]:
    """Validate every file and return (accepted, rejected).

    Each file is read and decoded once: the same bytes are validated, hashed (sha256 and perceptual
    hash) and written to `staging`.
    """
    source = source or Source("", [], {})
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
        check, gray = validate_image(data, min_size)
        if not check.ok:
            rejected.append({"file": relative, "reason": check.reason})
            continue
        staged = staging / str(index)
        staged.write_bytes(data)
        items.append(Item(relative, label, origin, patient_id(path.name), check.width, check.height,
                          hashlib.sha256(data).hexdigest(), staged, source.name, collection_of(source, path.name),
                          perceptual_hash(gray)))
    if source.name:
        for entry in rejected:
            entry["source"] = source.name
    return items, sorted(rejected, key=lambda r: r["file"])


def drop_patient_overlap(items: list[Item], policy: str) -> tuple[list[Item], dict[str, Any]]:
    """Handle train images of patients who are also in their source's official test split; report what was done."""
    test_patients = {(i.source, i.patient) for i in items if i.origin == "test"}
    shared = {(i.source, i.patient) for i in items if i.origin != "test"} & test_patients
    drop = [policy == "drop" and i.origin != "test" and (i.source, i.patient) in shared for i in items]
    kept = [i for i, gone in zip(items, drop) if not gone]
    return kept, {"policy": policy, "patients": len(shared), "images_dropped": sum(drop)}


def _group_names(items: list[Item], indices: list[int], labels: np.ndarray) -> dict[int, str]:
    """A readable id per group: its first '<source>/<patient>' in sorted order."""
    names: dict[int, str] = {}
    for index in indices:
        name = f"{items[index].source}/{items[index].patient}"
        names[labels[index]] = min(names.get(labels[index], name), name)
    return names


def assign_splits(items: list[Item], pairs: list[tuple[int, int, int]], val_fraction: float, test_fraction: float,
                  seed: int) -> None:
    """Set `group` and `split` on every item.

    Official test images stay test (grouped among themselves). The others are grouped by patient
    (within a source) and near-duplicate links, and each group goes whole to train, val or test:
    groups of sources without an official test split give `test_fraction` to test first, then
    `val_fraction` of the rest go to val, stratified by the group's class and collection.
    """
    in_test = [i.origin == "test" for i in items]
    patients: dict[tuple[str, str, bool], int] = {}
    links = [(i, j) for i, j, _ in pairs if in_test[i] == in_test[j]]
    for index, item in enumerate(items):
        first = patients.setdefault((item.source, item.patient, in_test[index]), index)
        links.append((first, index))
    labels = connected_groups(len(items), links)
    test_names = _group_names(items, [k for k in range(len(items)) if in_test[k]], labels)
    pool = [k for k in range(len(items)) if not in_test[k]]
    names = _group_names(items, pool, labels)
    taken = set(test_names.values())  # with patient_overlap: keep, a patient has a test and a train group
    names = {label: name + "+" if name in taken else name for label, name in names.items()}
    sources_with_test = {i.source for i in items if i.origin == "test"}
    touches_test = {labels[k] for k in pool if items[k].source in sources_with_test}
    strata = patient_classes([names[labels[k]] for k in pool], [f"{items[k].label}|{items[k].collection}" for k in pool])
    official = {g: s for g, s in strata.items() if g in {names[label] for label in touches_test}}
    carved = {g: s for g, s in strata.items() if g not in official}
    split_of = {**split_patients(official, val_fraction, seed),
                **split_patients(carved, val_fraction, seed, test_fraction)}
    for index, item in enumerate(items):
        item.group = test_names[labels[index]] if in_test[index] else names[labels[index]]
        item.split = "test" if in_test[index] else split_of[item.group]


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
        keep, *rest = sorted(group, key=lambda i: (priority[i.split], i.source, i.file))
        for item in rest:
            kind = "within_split" if item.split == keep.split else "across_splits"
            kept = item.split == "test"
            entry = {"file": item.file, "split": item.split, "duplicate_of": keep.file,
                     "duplicate_split": keep.split, "sha256": item.sha256,
                     "action": "kept (official test split)" if kept else "dropped"}
            if item.source != keep.source:
                entry.update(source=item.source, duplicate_source=keep.source)
            report[kind].append(entry)
            if not kept:
                dropped.add(id(item))
    for entries in report.values():
        entries.sort(key=lambda e: e["file"])
    return [i for i in items if id(i) not in dropped], report


def drop_near_copies_of_test(items: list[Item], pairs: list[tuple[int, int, int]]) -> tuple[list[Item], list[dict]]:
    """Drop images outside test that are near-duplicates of an official test image (the benchmark stays whole)."""
    found: dict[int, tuple[Item, int]] = {}
    for i, j, distance in pairs:
        for outside, inside in ((i, j), (j, i)):
            exact = items[inside].sha256 == items[outside].sha256  # drop_duplicates reports exact copies
            if items[inside].origin == "test" and items[outside].origin != "test" and not exact and outside not in found:
                found[outside] = (items[inside], distance)
    report = sorted(({"file": items[k].file, "source": items[k].source, "split": items[k].split,
                      "near_duplicate_of": test.file, "duplicate_source": test.source, "distance": distance,
                      "action": "dropped"} for k, (test, distance) in found.items()),
                    key=lambda e: (e["source"], e["file"]))
    return [item for k, item in enumerate(items) if k not in found], report


def near_duplicate_report(items: list[Item], pairs: list[tuple[int, int, int]], max_distance: int) -> dict[str, Any]:
    """Counts of exact and near-duplicate pairs, within and across sources, and of the groups they make."""
    across = [items[i].source != items[j].source for i, j, _ in pairs]
    exact = [items[i].sha256 == items[j].sha256 for i, j, _ in pairs]
    sizes = Counter(connected_groups(len(items), [(i, j) for i, j, _ in pairs]))
    return {
        "hash": "imagehash.phash, 256 bits (hash_size 16), of the decoded gray image",
        "max_distance": max_distance,
        "exact_pairs": {"within_sources": sum(e and not a for e, a in zip(exact, across)),
                        "across_sources": sum(e and a for e, a in zip(exact, across))},
        "near_pairs": {"within_sources": sum(not e and not a for e, a in zip(exact, across)),
                       "across_sources": sum(not e and a for e, a in zip(exact, across))},
        "images_with_a_near_duplicate": sum(n for n in sizes.values() if n > 1),
        "near_duplicate_groups": sum(n > 1 for n in sizes.values()),
        "largest_near_duplicate_group": max(sizes.values(), default=0),
        "across_sources_examples": sorted(
            [{"file": items[i].file, "source": items[i].source, "near_duplicate_of": items[j].file,
              "duplicate_source": items[j].source, "distance": d}
             for (i, j, d), a in zip(pairs, across) if a], key=lambda e: (e["source"], e["file"]))[:50],
    }


def write_images(items: list[Item], out: Path) -> list[dict[str, Any]]:
    """Move the staged bytes to out/images/<split>/<class>/<name>; return the manifest rows, sorted."""
    used: set[str] = set()
    rows = []
    for item in sorted(items, key=lambda i: (i.split, i.label, Path(i.file).name, i.source, i.file)):
        name = Path(item.file).name
        relative = f"images/{item.split}/{item.label}/{name}"
        counter = 1
        while relative in used:  # same name from two source folders (e.g. train/ and val/) or two sources
            counter += 1
            relative = f"images/{item.split}/{item.label}/{Path(name).stem}-{counter}{Path(name).suffix}"
        used.add(relative)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(item.staged, out / relative)
        rows.append({"path": relative, "label": item.label, "split": item.split, "patient": item.patient,
                     "width": item.width, "height": item.height, "sha256": item.sha256, "source": item.source,
                     "collection": item.collection, "group": item.group})
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
    distance = data.get("near_duplicate_distance", NEAR_DUPLICATE_DISTANCE)
    if not isinstance(distance, int) or not 0 <= distance < 256:
        raise ValueError(f"data.near_duplicate_distance is {distance!r}: set it in params.yaml to a whole number "
                         "of bits in [0, 256)")


def _where(source: Source, legacy: bool) -> str:
    """How an error names a source: 'data.source <location>' for the older form, else 'source <name> (<location>)'."""
    return f"data.source {source.locations[0]}" if legacy else f"source {source.name} ({source.locations[0]})"


def read_source(source: Source, legacy: bool, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """Fetch one source, scan and validate its images; stop with one line if it is unusable."""
    cache = data.get("download_cache")
    try:
        root, used, tried = fetch_first(source.locations, work / "fetch" / ("" if legacy else source.name), source.checksum,
                                        Path(cache) if cache else None, source.name)
    except DataSourceError as exc:
        if legacy or len(source.locations) > 1:  # the message names the source already
            raise
        raise DataSourceError(f"source {source.name}: {exc}") from None
    classes, files, stray = scan(root)
    where = _where(source, legacy)
    if not classes:
        setting = "data.source" if legacy else f"the location of source {source.name} in data.sources"
        raise DataSourceError(f"{where} holds no class folders: point {setting} at the folder above the class "
                              "folders (NORMAL/, PNEUMONIA/, ...), or above train/ and test/")
    items, rejected = read_images(root, files, stray, int(data["min_size"]), work / "staged" / source.name,
                                  None if legacy else source)
    if not items and files:
        raise DataSourceError(f"{where}: all {len(files)} images were rejected (e.g. {rejected[0]['file']}: "
                              f"{rejected[0]['reason']}): fix the files or set data.min_size, or remove the source")
    if not items:
        raise DataSourceError(f"{where} has class folders but no image files in them: add the images or remove "
                              "the source from params.yaml")
    for item in items:
        item.source = item.source or source.name
        item.collection = item.collection or source.name
    return {"name": source.name, "location": source.locations, "used": used, "failed": tried, "classes": classes,
            "images": len(files), "items": items, "rejected": rejected}


def _counts(rows: list[dict[str, Any]], classes: list[str], key: str) -> dict[str, dict[str, dict[str, int]]]:
    """Images per split, then per value of `key` (source or collection), then per class."""
    counts: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLIT_ORDER}
    for row in rows:
        per = counts[row["split"]].setdefault(row[key], {c: 0 for c in classes})
        per[row["label"]] += 1
    return {s: dict(sorted(v.items())) for s, v in counts.items()}


def ingest(data: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the stage with the `data:` params; write everything under `out` and return the report."""
    _check_params(data)
    sources, legacy = read_sources(data), bool(data.get("source")) or not data.get("sources")
    policy, seed = data.get("patient_overlap", "drop"), int(data["seed"])
    max_distance = int(data.get("near_duplicate_distance", NEAR_DUPLICATE_DISTANCE))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out` (same disk: moves, not copies), named after this process: a killed run's is removed here.
    remove_dead_leftovers(out.parent, f".{out.name}")
    work = out.parent / leftover_name(f".{out.name}")
    work.mkdir()
    try:
        found = [read_source(source, legacy, data, work) for source in sources]
        classes = sorted({c for f in found for c in f["classes"]})
        if len(classes) < 2:
            where = _where(sources[0], legacy) if legacy else "data.sources"
            raise DataSourceError(f"{where} holds {len(classes)} class folder(s) and a classifier needs "
                                  "at least 2: point data.source at the folder above the class folders")
        items = [item for f in found for item in f["items"]]
        rejected = [r for f in found for r in f["rejected"]]
        if not any(i.origin != "test" for i in items):
            raise DataSourceError(f"{_where(sources[0], legacy) if legacy else 'data.sources'} has no usable "
                                  "training images: point data.source at a dataset with a train split or class "
                                  "folders")
        named_by = {c: [f["name"] for f in found if c in f["classes"]] for c in classes}
        single = {c: names[0] for c, names in named_by.items() if len(names) == 1} if len(found) > 1 else {}
        items, overlap = drop_patient_overlap(items, policy)
        pairs = near_pairs(np.stack([i.phash for i in items]), max_distance)
        near = near_duplicate_report(items, pairs, max_distance)
        assign_splits(items, pairs, float(data["val_fraction"]), float(data.get("test_fraction", 0)), seed)
        items, near_copies = drop_near_copies_of_test(items, pairs)
        items, duplicates = drop_duplicates(items)
        duplicates["near_copies_of_official_test"] = near_copies
        result = work / "out"
        rows = write_images(items, result)
        digest = write_manifest(rows, result / "manifest.csv")
        counts = {s: {c: 0 for c in classes} for s in SPLIT_ORDER}
        for row in rows:
            counts[row["split"]][row["label"]] += 1
        splits_of_group: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            splits_of_group[row["group"]].add(row["split"])
        near["groups"] = len(splits_of_group)
        near["groups_in_two_splits"] = sum(len(s) > 1 for s in splits_of_group.values())
        report = {"classes": classes, "counts": counts, "counts_by_collection": _counts(rows, classes, "collection"),
                  "rejected": rejected, "duplicates": duplicates, "near_duplicates": near,
                  "patient_overlap": overlap, "classes_in_one_source": single,
                  "sources": [{k: v for k, v in f.items() if k != "items"} | {"rejected": len(f["rejected"])}
                              for f in found],
                  "dataset_sha256": digest, "seed": seed}
        if legacy:
            report["source"] = sources[0].locations[0]
            report["sources_ignored"] = [s.get("name") for s in data.get("sources") or [] if isinstance(s, dict)]
        (result / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(result, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(report: dict[str, Any], out: Path) -> str:
    """A few lines for the terminal: images per split and class (and collection), and what was left out."""
    lines = [f"{split:<5} " + "  ".join(f"{c} {n:,}" for c, n in counts.items()) + f"  (total {sum(counts.values()):,})"
             for split, counts in report["counts"].items()]
    if len(report["sources"]) > 1:
        for split, per in report["counts_by_collection"].items():
            lines += [f"  {split:<5} {name:<16} " + "  ".join(f"{c} {n:,}" for c, n in counts.items() if n)
                      for name, counts in per.items()]
    if report.get("sources_ignored"):
        lines.append(f"note: data.source is set, so it is the only source; data.sources "
                     f"({', '.join(map(str, report['sources_ignored']))}) left aside: set data.source to null to use them")
    for label, name in report["classes_in_one_source"].items():
        lines.append(f"note: class {label} comes from source {name} only (no other source names it): a model can "
                     "tell it apart by where the image came from; measure per source")
    for source in report["sources"]:
        for failed in source["failed"]:
            lines.append(f"source {source['name']}: {failed['location']} did not work ({failed['reason']}); "
                         f"used {source['used']}")
    dup, overlap, near = report["duplicates"], report["patient_overlap"], report["near_duplicates"]
    dropped = {kind: sum(d["action"] == "dropped" for d in found) for kind, found in dup.items()}
    lines.append(f"rejected {len(report['rejected'])}; duplicates dropped {dropped['within_split']} within and "
                 f"{dropped['across_splits']} across splits; patient overlap with test: "
                 f"{overlap['patients']} patients, {overlap['images_dropped']} train images dropped "
                 f"({overlap['policy']})")
    lines.append(f"near-duplicates (distance <= {near['max_distance']}): {sum(near['near_pairs'].values())} pairs "
                 f"({near['near_pairs']['across_sources']} across sources), exact copies "
                 f"{sum(near['exact_pairs'].values())} pairs; {near['near_duplicate_groups']} groups hold "
                 f"{near['images_with_a_near_duplicate']} images; {len(dup['near_copies_of_official_test'])} "
                 f"near copies of official test images dropped; groups in two splits: {near['groups_in_two_splits']}")
    lines.append(f"wrote {out}/manifest.csv and {out}/report.json (dataset sha256 {report['dataset_sha256'][:12]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__, tensorflow=False)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/data")
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_stage(lambda: print(summary(ingest(load_params(args.params)["data"], out), out)), out)


if __name__ == "__main__":
    main()
