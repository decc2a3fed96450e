"""Splitting by patient (chestxray.data.split) on constructed patients: exact counts, disjointness, ties.

test_ingest.py checks the same on the real Kermany file names; these need no data.
"""
from __future__ import annotations

import numpy as np
import pytest

from chestxray.data.split import _take_count, carve_patients, patient_classes, split_patients, stratified_subset


@pytest.mark.parametrize("n, fraction, count", [
    (10, 0.15, 2),    # 1.5 rounds half up to 2
    (10, 0.25, 3),    # 2.5 rounds half up to 3
    (10, 0.24, 2),
    (100, 0.1, 10),
    (2, 0.01, 1),     # at least one...
    (2, 0.99, 1),     # ...but never all
    (3, 0.99, 2),
    (3, 0.5, 2),
    (1, 0.5, 0),      # one patient cannot be split
    (0, 0.5, 0),
    (5, 0.0, 0),
    (5, -0.2, 0),
])
def test_how_many_patients_a_fraction_takes(n, fraction, count):
    assert _take_count(n, fraction) == count


def patients(normal: int, pneumonia: int) -> dict[str, str]:
    return {**{f"n{k:02d}": "NORMAL" for k in range(normal)}, **{f"p{k:02d}": "PNEUMONIA" for k in range(pneumonia)}}


def test_carve_is_stratified_and_seeded():
    classes = patients(10, 30)
    chosen = carve_patients(classes, 0.2, np.random.default_rng(0))
    assert sum(classes[p] == "NORMAL" for p in chosen) == 2
    assert sum(classes[p] == "PNEUMONIA" for p in chosen) == 6
    assert chosen == carve_patients(classes, 0.2, np.random.default_rng(0))
    assert chosen != carve_patients(classes, 0.2, np.random.default_rng(1))
    # The insertion order of the mapping does not matter, only the seed.
    assert chosen == carve_patients(dict(reversed(list(classes.items()))), 0.2, np.random.default_rng(0))


def test_split_assigns_every_patient_once_with_exact_counts():
    classes = patients(20, 40)
    split = split_patients(classes, 0.25, seed=3)
    assert set(split) == set(classes) and set(split.values()) == {"train", "val"}
    val = [p for p, s in split.items() if s == "val"]
    assert sorted(classes[p] for p in val).count("NORMAL") == 5
    assert sorted(classes[p] for p in val).count("PNEUMONIA") == 10
    assert split == split_patients(classes, 0.25, seed=3)
    assert split != split_patients(classes, 0.25, seed=4)


def test_test_patients_are_carved_first_then_val_from_the_rest():
    classes = patients(20, 40)
    split = split_patients(classes, 0.25, seed=3, test_fraction=0.1)
    counts = {(s, c): 0 for s in ("train", "val", "test") for c in ("NORMAL", "PNEUMONIA")}
    for patient, part in split.items():
        counts[part, classes[patient]] += 1
    # test: 10% of 20 and of 40; val: 25% of the remaining 18 and 36 (4.5 -> 5, 9).
    assert counts == {("test", "NORMAL"): 2, ("test", "PNEUMONIA"): 4, ("val", "NORMAL"): 5,
                      ("val", "PNEUMONIA"): 9, ("train", "NORMAL"): 13, ("train", "PNEUMONIA"): 27}
    # The test patients are the ones a test-only carve with the same seed picks first.
    assert {p for p, s in split.items() if s == "test"} == carve_patients(classes, 0.1, np.random.default_rng(3))


@pytest.mark.parametrize("test_fraction", [None, 0, 0.0])
def test_no_test_fraction_means_no_test_split_and_the_same_val(test_fraction):
    classes = patients(20, 40)
    split = split_patients(classes, 0.25, seed=3, test_fraction=test_fraction)
    assert split == split_patients(classes, 0.25, seed=3)
    assert "test" not in split.values()


def test_patient_class_ties_go_to_the_first_class_by_name():
    assert patient_classes(["a", "a", "b", "b"], ["Y", "X", "X", "Y"]) == {"a": "X", "b": "X"}
    assert patient_classes(["a", "a", "a"], ["Y", "X", "Y"]) == {"a": "Y"}
    assert patient_classes([], []) == {}


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 30 + [1] * 70)
    chosen = stratified_subset(labels, 20, seed=1)
    assert len(chosen) == 20 and (labels[chosen] == 0).sum() == 6
    assert np.array_equal(chosen, stratified_subset(labels, 20, seed=1))
    assert len(stratified_subset(labels, 0, seed=1)) == 100 and len(stratified_subset(labels, 500, seed=1)) == 100
