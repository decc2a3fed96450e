"""Time the ingest stage downloading the whole Kermany 224 px set from a local HTTP server that cuts it off.

    python bench/download_faults.py     # from the project root, with the venv active

Three cases, with the real retry settings (chestxray.data.sources.DOWNLOAD_ATTEMPTS, DOWNLOAD_BACKOFF_S):
the download in full; the first response cut off half-way (then served in full); every response cut
off half-way. Reports seconds and requests to success or to the error. Writes
bench/results/download_faults.json and prints a Markdown table for README.md.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from chestxray.data.sources import DataSourceError  # noqa: E402
from chestxray.pipeline.ingest import ingest  # noqa: E402
from faulty_http import FaultyServer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "kermany224"
CASES = {"in full": 0, "cut off once": 1, "always cut off": 99}


def make_archive(folder: Path, dest: Path) -> bytes:
    """The data set as one zip (stored, like most downloads of JPEGs)."""
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*.jpeg")):
            zf.write(path, f"chest_xray/{path.relative_to(folder).as_posix()}")
    return dest.read_bytes()


def run_case(body: bytes, cut: int, work: Path) -> dict:
    """Ingest from a server cutting the first `cut` responses; seconds, requests and the outcome."""
    params = {"checksum": "sha256:" + hashlib.sha256(body).hexdigest(), "val_fraction": 0.1, "test_fraction": 0.15,
              "min_size": 128, "patient_overlap": "drop", "seed": 42}
    with FaultyServer(body, cut=cut) as server:
        start = time.perf_counter()
        try:
            report = ingest({**params, "source": server.url}, work / "artifacts" / "data")
            outcome = (f"{sum(sum(c.values()) for c in report['counts'].values()):,} images ingested, "
                       f"dataset sha256 {report['dataset_sha256'][:12]}")
        except DataSourceError as exc:
            outcome = f"error: {exc}"
        seconds = time.perf_counter() - start
    leftovers = sorted(p.name for p in (work / "artifacts").iterdir() if p.name != "data")
    return {"seconds": round(seconds, 2), "requests": server.requests, "outcome": outcome, "leftovers": leftovers}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        body = make_archive(DATA, Path(tmp) / "kermany224.zip")
        results = {"archive_mb": round(len(body) / 2**20, 1)}
        for name, cut in CASES.items():
            results[name] = run_case(body, cut, Path(tmp) / name.replace(" ", "_"))
    out = ROOT / "bench" / "results" / "download_faults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"archive {results['archive_mb']} MB\n\n| case | seconds | requests | outcome |\n|---|---:|---:|---|")
    for name in CASES:
        r = results[name]
        print(f"| {name} | {r['seconds']:.1f} | {r['requests']} | {r['outcome']} |")


if __name__ == "__main__":
    main()
