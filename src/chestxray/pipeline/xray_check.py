"""Stage, xray_check: the "not a chest X-ray" detector, fitted and measured leaving one source out.

    python -m chestxray.pipeline.xray_check --params params.yaml --data artifacts/data --out artifacts/xray_check

Chest X-rays: the ingested train and validation images of every source (test images are kept back
to measure), and the folders in `xray_check.extra_sources` (e.g. full-size originals as uploaded).
Not chest X-rays: the images that ship with installed packages (chestxray.evaluation.ood_samples),
each with `xray_check.variants` altered copies.

Every X-ray has an *origin*: its source or, for a source with collections, its collection and class
(tb256: hospital TB, hospital normal, public TB, public normal); with a single source, three seeded
parts of it stand in for origins. For each origin in turn a detector is fitted on all the others
(and on five sixths of the non-X-ray images, split by original image) and scores the held-out origin
and the held-out non-X-rays. The threshold is the one that best separates these out-of-fold scores
(balanced accuracy): chosen on images the detectors did not see, never on the test split. The served
detector is then fitted on everything and given that threshold. Every fit weighs each origin's X-rays
equally (the 2,500 Kermany films would otherwise drown the 287 normals of one adult collection). For
time, each of those fits takes at most `fold_max_per_origin` X-rays an origin, the served one
`max_per_origin`; a held-out origin is scored on all of its own.

Writes detector.npz (weights and threshold: chestxray.model.xray_detector) and xray_check.json (the
leave-one-source-out table, non-X-ray refusals by kind, test X-ray acceptance, time per image).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from chestxray.model.artifacts import XRAY_CHECK_FILE
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_params

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--out", default="artifacts/xray_check")
    args = parser.parse_args(argv)
    run_stage(lambda: xray_check(load_params(args.params, "xray_check"), Path(args.data), Path(args.out)),
              Path(args.out))


def _inputs(paths: list[Path], text_share: float = 0.0, seed: int = 0) -> np.ndarray:
    """Detector inputs of image files; `text_share` of them with letters burned in (with_burned_in_text)."""
    from chestxray.data.preprocess import decode_image
    from chestxray.model.xray_detector import detector_input

    rng = np.random.default_rng(seed)
    grays = (decode_image(p.read_bytes()) for p in paths)
    return np.stack([detector_input(with_burned_in_text(g, rng) if rng.random() < text_share else g) for g in grays])


def with_burned_in_text(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of an X-ray with a few markers, dates or handwriting-like strings burned in, as many films carry.

    Without it the detector learns "text means a document" (the non-X-rays include pages and forms)
    and refuses annotated films of a hospital it has not seen.
    """
    import cv2

    out = gray.copy()
    h, w = out.shape[:2]
    for _ in range(int(rng.integers(1, 5))):
        text = "".join(rng.choice(list("ABCDEFGHLMNPRSTXYZ0123456789/-:. "), int(rng.integers(1, 12))))
        scale = float(rng.uniform(0.5, 3.0)) * max(h, w) / 512
        position = (int(rng.integers(0, max(1, w // 2))), int(rng.integers(max(2, h // 12), h)))
        colour = 255 if rng.random() < 0.7 else 0
        font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_PLAIN]))
        cv2.putText(out, text, position, font, scale, colour, max(1, int(2 * scale)), cv2.LINE_AA)
    return out


def xrays_by_origin(data_dir: Path, extra_sources: list[str], limit: int, seed: int
                    ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(origin -> X-ray files to fit on, at most `limit` each, seeded; origin -> test files of the ingested data)."""
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv")
    source = manifest["source"] if "source" in manifest else pd.Series("data", index=manifest.index)
    collection = manifest["collection"] if "collection" in manifest else source
    origin = np.where(collection == source, source, collection + "/" + manifest["label"])  # e.g. tb256/public/NORMAL
    fit, test = {}, {}
    for name in sorted(set(origin)):
        rows = manifest[origin == name]
        fit[name] = [data_dir / p for p in rows.path[rows.split != "test"]]
        test[name] = [data_dir / p for p in rows.path[rows.split == "test"]]
    for folder in extra_sources:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:  # e.g. a machine without the offline data copies: the detector is still fitted, on fewer sources
            print(f"xray_check: no images in {folder} (xray_check.extra_sources): measured without it")
            continue
        fit[Path(folder).name] = files
    rng = np.random.default_rng(seed)
    fit = {k: [v[i] for i in sorted(rng.choice(len(v), limit, replace=False))] if len(v) > limit else v
           for k, v in fit.items() if v}
    if len(fit) == 1:  # one source: nothing to leave out, so three seeded parts of it stand in for sources
        (name, files), = fit.items()
        parts = rng.permutation(len(files)) % 3
        fit = {f"{name} (part {k + 1} of 3)": [f for f, p in zip(files, parts) if p == k] for k in range(3)}
    return fit, {k: v for k, v in test.items() if v}


def non_xrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Detector inputs of every non-X-ray sample and its altered copies, the sample index of each, the samples."""
    from chestxray.data.preprocess import decode_image
    from chestxray.evaluation.ood_samples import non_xray_samples, variants
    from chestxray.model.xray_detector import detector_input

    rng = np.random.default_rng(seed)
    inputs, groups, samples = [], [], []
    for k, sample in enumerate(non_xray_samples()):
        views = variants(decode_image(sample.data), count, rng)
        inputs += [detector_input(v) for v in views]
        groups += [k] * len(views)
        samples.append({"name": sample.name, "kind": sample.source})
    return np.stack(inputs), np.array(groups), samples


def _at_most(inputs: dict[str, np.ndarray], limit: int, seed: int) -> dict[str, np.ndarray]:
    """Each origin's inputs, at most `limit` of them (seeded)."""
    rng = np.random.default_rng(seed)
    return {k: v[np.sort(rng.choice(len(v), limit, replace=False))] if len(v) > limit else v for k, v in inputs.items()}


def best_threshold(xray_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """The threshold on P(chest X-ray) with the best balanced accuracy; among ties the one nearest 0.5."""
    grid = np.round(np.linspace(0.01, 0.99, 99), 2)
    balanced = [(np.mean(xray_scores >= t) + np.mean(other_scores < t)) / 2 for t in grid]
    best = np.flatnonzero(np.isclose(balanced, max(balanced)))
    return float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])


def _share(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)), 4) if len(mask) else None


def xray_check(params: dict, data_dir: Path, out: Path) -> dict:
    """Fit and measure the detector leaving one origin out; fit the served one; write detector.npz + xray_check.json."""
    from chestxray.model.xray_detector import XrayDetector, detector_input

    started = time.perf_counter()
    fit_files, test_files = xrays_by_origin(data_dir, params.get("extra_sources") or [], params["max_per_origin"],
                                            params["seed"])
    xrays = {name: _inputs(files, params.get("text_share", 0.0), params["seed"]) for name, files in fit_files.items()}
    others, groups, samples = non_xrays(params["variants"], params["seed"])
    origins = sorted(xrays)
    folds = len(origins)
    fold_of_sample = np.random.default_rng(params["seed"]).permutation(len(samples)) % folds
    other_fold = fold_of_sample[groups]

    # Leave one origin out (and one sixth of the non-X-ray originals): out-of-fold scores only. Six fits cost
    # most of the stage, so each fits on fewer X-rays an origin; the held-out origin is scored on all of its own.
    fold_xrays = _at_most(xrays, params.get("fold_max_per_origin") or params["max_per_origin"], params["seed"])
    held_out_scores, other_scores = {}, np.zeros(len(others))
    for k, name in enumerate(origins):
        kept = [o for o in origins if o != name]
        detector = XrayDetector.fit(np.concatenate([fold_xrays[o] for o in kept]), others[other_fold != k],
                                    params["epochs"], params["seed"],
                                    np.concatenate([np.full(len(fold_xrays[o]), 1 / len(fold_xrays[o])) for o in kept]))
        held_out_scores[name] = detector.scores(xrays[name])
        other_scores[other_fold == k] = detector.scores(others[other_fold == k])
        print(f"xray_check: fold {k + 1} of {folds} (held out {name}): {np.mean(held_out_scores[name] >= 0.5):.1%} "
              f"accepted, {time.perf_counter() - started:.0f}s", flush=True)
    threshold = best_threshold(np.concatenate(list(held_out_scores.values())), other_scores)

    detector = XrayDetector.fit(np.concatenate(list(xrays.values())), others, params["epochs"], params["seed"],
                                np.concatenate([np.full(len(v), 1 / len(v)) for v in xrays.values()]))
    detector.threshold = threshold
    detector.save(out)

    summary = {
        "method": "a small CNN on a 64x64 grayscale thumbnail (chestxray.model.xray_detector), fitted on chest X-rays "
                  "of every source against images that are not chest X-rays",
        "threshold": threshold,
        "chosen_on": "out-of-fold scores, leaving one source out (never the test split)",
        "leave_one_source_out": {name: {"n": len(s), "accepted_share": _share(s >= threshold),
                                        "accepted_share_at_0.5": _share(s >= 0.5)}
                                 for name, s in held_out_scores.items()},
        "non_xrays": _non_xray_summary(other_scores, groups, samples, threshold),
        "test_xrays": {name: {"n": len(files), "accepted_share": _share(detector.scores(_inputs(files)) >= threshold)}
                       for name, files in test_files.items()},
        "n_fit": {"xrays": int(sum(len(v) for v in xrays.values())), "non_xrays": int(len(others)),
                  "non_xray_originals": len(samples),
                  "fold_xrays_per_origin": {k: int(len(v)) for k, v in fold_xrays.items()}},
    }
    summary["worst_held_out_source_accepted"] = min(v["accepted_share"] for v in summary["leave_one_source_out"].values())
    probe = [np.full((1024, 1024), 128, np.uint8)] * 50  # a full-size upload: thumbnail + forward pass per image
    timer = time.perf_counter()
    for gray in probe:
        detector.scores(detector_input(gray)[None])
    summary["ms_per_image"] = round(1000 * (time.perf_counter() - timer) / len(probe), 3)
    summary["time_s"] = round(time.perf_counter() - started, 1)
    (out / XRAY_CHECK_FILE).write_text(json.dumps(summary, indent=2))
    print(f"xray_check: threshold {threshold:.2f}; held-out sources accepted "
          + ", ".join(f"{k} {v['accepted_share']:.1%}" for k, v in summary["leave_one_source_out"].items())
          + f"; non-X-rays refused {summary['non_xrays']['refused_share']:.1%}; {summary['time_s']:.0f}s")
    return summary


def _non_xray_summary(scores: np.ndarray, groups: np.ndarray, samples: list[dict], threshold: float) -> dict:
    """Out-of-fold refusal of the non-X-ray images: all copies, the unaltered originals, by kind; what got through."""
    refused = scores < threshold
    originals = np.array([np.flatnonzero(groups == k)[0] for k in range(len(samples))])
    kinds = np.array([samples[g]["kind"] for g in groups])
    return {"n": int(len(scores)), "refused_share": _share(refused),
            "originals_refused_share": _share(refused[originals]),
            "by_kind": {kind: _share(refused[kinds == kind]) for kind in dict.fromkeys(kinds)},
            "originals_accepted": [samples[k]["name"] for k, i in enumerate(originals) if not refused[i]]}


if __name__ == "__main__":
    main()
