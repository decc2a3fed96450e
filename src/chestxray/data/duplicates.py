"""Near-duplicate images: a perceptual hash per image, all pairs within a Hamming distance, and groups.

Public compilations re-publish each other's images resized and re-encoded, and one film is often
exported twice; such copies must sit in one split. The hash is imagehash's 256-bit DCT hash
(`phash`, hash_size 16) of the decoded gray image. Measured on the real data (docs/data.md,
tests/test_duplicates.py): resized / re-encoded copies lie at distance <= 8 of their originals,
visually confirmed re-exports of one film up to 48, different patients from about 52, and
unrelated images of different sources never below 56.
"""
from __future__ import annotations

from collections.abc import Iterable

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_SIZE = 16  # 16 x 16 = 256 bits
NEAR_DUPLICATE_DISTANCE = 48  # the default data.near_duplicate_distance: between re-exports (<= 48) and other films (>= 52)
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
_CHUNK = 2048  # rows compared at once: a 2048 x n float32 block (~80 MB for 10,000 images)


def perceptual_hash(gray: np.ndarray) -> np.ndarray:
    """The 256-bit perceptual hash of a decoded gray image, packed into 32 bytes."""
    return np.packbits(imagehash.phash(Image.fromarray(gray), hash_size=HASH_SIZE).hash.ravel())


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j whose hashes differ in at most `max_distance` bits.

    All pairs as one matrix product per chunk: distance = |a| + |b| - 2 a.b over the bits
    (exact in float32 for 256 bits); 10,000 images take a few seconds.
    """
    if len(hashes) == 0:
        return []
    bits = np.unpackbits(np.asarray(hashes, dtype=np.uint8), axis=1).astype(np.float32)
    ones = bits.sum(axis=1)
    pairs = []
    for start in range(0, len(bits), _CHUNK):
        block = bits[start:start + _CHUNK]
        distance = ones[start:start + _CHUNK, None] + ones[None, :] - 2 * (block @ bits.T)
        rows, cols = np.nonzero(distance <= max_distance + 0.5)
        rows += start
        keep = rows < cols
        pairs += [(int(i), int(j), int(round(float(distance[i - start, j]))))
                  for i, j in zip(rows[keep], cols[keep])]
    return pairs


def connected_groups(n: int, links: Iterable[tuple[int, int]]) -> np.ndarray:
    """Group label (0..k-1) of each of n items, items joined by any chain of links (union-find)."""
    links = list(links)
    rows = np.array([i for i, _ in links], dtype=np.int64)
    cols = np.array([j for _, j in links], dtype=np.int64)
    graph = coo_matrix((np.ones(len(links)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
