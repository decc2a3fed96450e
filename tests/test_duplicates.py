"""Near-duplicates: real films copied the way public compilations re-publish them (resized, re-encoded,
another format) are found, within and across sources, and a group never straddles two splits."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray.data.duplicates import NEAR_DUPLICATE_DISTANCE, near_pairs, perceptual_hash
from chestxray.pipeline.ingest import ingest


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


def _copies(path: Path) -> dict[str, Image.Image]:
    """The ways a film is re-published: smaller, re-compressed, as PNG, slightly brighter."""
    original = Image.open(path).convert("L")
    jpeg = io.BytesIO()
    original.save(jpeg, "JPEG", quality=60)
    return {"resized_180": original.resize((180, 180), Image.BILINEAR),
            "upsized_400": original.resize((400, 400), Image.BICUBIC),
            "jpeg_q60": Image.open(io.BytesIO(jpeg.getvalue())),
            "brighter": original.point(lambda v: min(255, int(v * 1.1)))}


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def test_resized_and_reencoded_copies_are_near_and_other_films_are_not(tb256):
    films = sorted((tb256 / "TUBERCULOSIS").glob("TB.*.jpg"))[:6] + sorted((tb256 / "NORMAL").glob("Normal-*.png"))[:6]
    hashes = {f: perceptual_hash(_gray(Image.open(f))) for f in films}
    for film in films:
        for name, copy in _copies(film).items():
            assert _distance(hashes[film], perceptual_hash(_gray(copy))) <= NEAR_DUPLICATE_DISTANCE // 2, (film, name)
    different = [_distance(hashes[a], hashes[b]) for i, a in enumerate(films) for b in films[i + 1:]]
    assert min(different) > NEAR_DUPLICATE_DISTANCE


def test_near_pairs_finds_exactly_the_copies(tb256):
    films = sorted((tb256 / "NORMAL").glob("others_*.jpg"))[:5]
    images = [_gray(Image.open(f)) for f in films] + [_gray(_copies(films[2])["resized_180"])]
    pairs = near_pairs(np.stack([perceptual_hash(g) for g in images]), NEAR_DUPLICATE_DISTANCE)
    assert [(i, j) for i, j, _ in pairs] == [(2, 5)]


@pytest.fixture
def two_sources(tb256, tmp_path) -> tuple[Path, Path, list[str]]:
    """Source `a`: 40 real tb256 films per class; source `b`: 10 other films per class plus resized,
    re-encoded copies of 8 of a's films (as PNG), under new names."""
    a, b = tmp_path / "a", tmp_path / "b"
    copied = []
    for label, pattern in (("TUBERCULOSIS", "TB.*.jpg"), ("NORMAL", "others_*.jpg")):
        films = sorted((tb256 / label).glob(pattern))
        (a / label).mkdir(parents=True)
        (b / label).mkdir(parents=True)
        for f in films[:40]:
            Image.open(f).save(a / label / f.name)
        for f in films[40:50]:
            Image.open(f).save(b / label / f.name)
        for k, f in enumerate(films[:40:10]):
            _copies(f)["resized_180"].resize((200, 200)).save(b / label / f"copy_{label}_{k}.png")
            copied.append(f.name)
    return a, b, copied


def test_copies_across_sources_share_one_split_and_are_reported(two_sources, tmp_path):
    a, b, copied = two_sources
    data = {"sources": [{"name": "a", "location": str(a)}, {"name": "b", "location": str(b)}], "source": None,
            "checksum": None, "val_fraction": 0.2, "test_fraction": 0.25, "min_size": 128,
            "patient_overlap": "drop", "near_duplicate_distance": NEAR_DUPLICATE_DISTANCE, "seed": 42}
    out = tmp_path / "out"
    report = ingest(data, out)

    near = report["near_duplicates"]
    assert near["near_pairs"]["across_sources"] + near["exact_pairs"]["across_sources"] >= len(copied)
    assert near["groups_in_two_splits"] == 0
    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    splits_of_group = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    sources_of_group = defaultdict(set)
    for row in rows:
        sources_of_group[row["group"]].add(row["source"])
    assert sum(len(s) == 2 for s in sources_of_group.values()) >= len(copied)  # each copy joined its original
    assert {r["split"] for r in rows} == {"train", "val", "test"}
