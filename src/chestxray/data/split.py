"""Splitting by patient: images of one patient never land in two splits.

Kermany file names carry the patient (`person12_bacteria_45.jpeg`, `IM-0115-0001.jpeg`,
`NORMAL2-IM-0115-0001.jpeg`); any other name counts as a patient of its own. The split is
stratified by each patient's class and fully determined by the seed.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

_PERSON = re.compile(r"(person\d+)_(?:bacteria|virus)_", re.IGNORECASE)
_IM = re.compile(r"(?:NORMAL2-)?(IM-\d+)-\d+", re.IGNORECASE)


def patient_id(filename: str | Path) -> str:
    """The patient an image belongs to, from its file name; the file stem when the name has no patient."""
    stem = Path(filename).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def patient_classes(patients: Iterable[str], labels: Iterable[str]) -> dict[str, str]:
    """Each patient's class: the most frequent label among its images (ties go to the first class by name)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for patient, label in zip(patients, labels):
        counts[patient][label] += 1
    return {p: min(c, key=lambda label: (-c[label], label)) for p, c in counts.items()}


def _take_count(n: int, fraction: float) -> int:
    """How many of n patients a fraction means: rounded, and at least one but never all when n >= 2."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)


def carve_patients(patient_class: Mapping[str, str], fraction: float, rng: np.random.Generator) -> set[str]:
    """Pick `fraction` of the patients of every class (stratified), using `rng`."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, label in patient_class.items():
        by_class[label].append(patient)
    chosen: set[str] = set()
    for label in sorted(by_class):  # fixed order, so the rng draws are the same on every run
        members = sorted(by_class[label])
        order = rng.permutation(len(members))[: _take_count(len(members), fraction)]
        chosen.update(members[i] for i in order)
    return chosen


def split_patients(
    patient_class: Mapping[str, str],
    val_fraction: float,
    seed: int,
    test_fraction: float | None = None,
) -> dict[str, str]:
    """Assign every patient to 'train', 'val' or 'test'.

    With `test_fraction` (a source without an official test split) the test patients are carved
    first; `val_fraction` of the remaining patients then go to val.
    """
    rng = np.random.default_rng(seed)
    remaining = dict(patient_class)
    test = carve_patients(remaining, test_fraction, rng) if test_fraction else set()
    remaining = {p: c for p, c in remaining.items() if p not in test}
    val = carve_patients(remaining, val_fraction, rng)
    return {p: "test" if p in test else "val" if p in val else "train" for p in patient_class}


def stratified_subset(labels: Iterable, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of `limit` items, each label in its share (all when 0 or not fewer)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(list(labels))
    index = np.arange(len(labels))
    if not limit or limit >= len(labels):
        return index
    chosen, _ = train_test_split(index, train_size=limit, stratify=labels, random_state=seed)
    return np.sort(chosen)
