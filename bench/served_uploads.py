"""Real X-rays as users upload them, through the served path: refused, warned, answered, and right?

    python bench/served_uploads.py                                    # artifacts/ and the full-size originals
    python bench/served_uploads.py --artifacts A --folder F [--folder G]

Each folder holds class subfolders (NORMAL/, PNEUMONIA/, ...) of image files, sent as they are, file
by file, through `Predictor.predict_images` (what /predict and `chestxray predict` run): the
"not a chest X-ray" detector, then the classifier and the population check. Per folder: how many were
refused as not a chest X-ray, how many answered with the `outside_validated_population` warning, with
`low_confidence`, and how many answers name the folder's class. Also times the detector alone per image.
Prints a Markdown table and writes bench/results/served_uploads.json (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(predictor, folder: Path) -> dict:
    files = sorted(p for p in folder.glob("*/*") if p.is_file())
    counts = {"n": len(files), "refused_not_xray": 0, "other_errors": 0, "warned_population": 0,
              "low_confidence": 0, "correct": 0}
    for path in files:
        [result] = predictor.predict_images([path.read_bytes()])
        if result.error is not None:
            counts["refused_not_xray" if result.error.code == "not_a_chest_xray" else "other_errors"] += 1
            continue
        p = result.prediction
        counts["warned_population"] += "outside_validated_population" in p.warnings
        counts["low_confidence"] += p.low_confidence
        counts["correct"] += p.predicted_class == path.parent.name
    return counts


def detector_ms(predictor, folder: Path, repeats: int = 3) -> float | None:
    """Milliseconds per image of the "not a chest X-ray" check on prepared inputs (the served call)."""
    if not predictor.xray_check.on:
        return None
    inputs = np.stack([predictor.prepare(p.read_bytes()) for p in sorted(folder.glob("*/*"))[:16]])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for x in inputs:
            predictor.xray_check.scores(x[None])
        best = min(best, (time.perf_counter() - started) / len(inputs))
    return round(1000 * best, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    parser.add_argument("--folder", action="append", help="class subfolders of real X-rays (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/served_uploads.json"))
    args = parser.parse_args()
    folders = [Path(f) for f in (args.folder or [ROOT.parent / "shared/data/kermany-val-fullsize"])]

    from chestxray.logs import quiet_libraries
    from chestxray.model.predictor import Predictor

    quiet_libraries()
    predictor = Predictor.from_artifacts(args.artifacts)
    results = {f.name: measure(predictor, f) for f in folders}
    timing = detector_ms(predictor, folders[0])
    print("| folder | images | refused (not a chest X-ray) | warned (outside population) | low confidence | "
          "right class |\n|---|---:|---:|---:|---:|---:|")
    for name, c in results.items():
        print(f"| {name} | {c['n']} | {c['refused_not_xray']} | {c['warned_population']} | {c['low_confidence']} "
              f"| {c['correct']} |")
    print(f"\n'not a chest X-ray' check: {timing} ms per image (prepared input, best of 3); backend "
          f"{predictor.backend}; detector {'on' if predictor.xray_check.on else 'off'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"folders": results, "detector_ms_per_image": timing,
                               "backend": predictor.backend}, indent=2))


if __name__ == "__main__":
    main()
