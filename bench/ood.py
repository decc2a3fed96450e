"""The population check on a trained model: real X-rays warned about, non-X-ray images warned about.

    python bench/ood.py                                # the model in artifacts/, after `dvc repro`
    python bench/ood.py --artifacts ../main/artifacts  # any artifacts folder (read only)

Runs the reference stage's own function (chestxray.pipeline.reference, with params.yaml's
`reference` section, but on every test X-ray instead of `reference.max_test_images`) on the
artifacts' model and data, writing its output to a temporary folder (never into the artifacts,
never to MLflow), and times it. The stage fits the reference on train
X-rays, sets the warn threshold on validation X-rays only, and measures the share of test X-rays
warned about. This script then scores the non-X-ray images that ship with installed packages
(chestxray.evaluation.ood_samples): the population check never refuses, so a non-X-ray should at
least be warned about (refusing it is the "not a chest X-ray" detector's job, measured by its own
stage). For information only (not counted), it scores altered test X-rays: inverted, upside down,
darkened, rotated 90 degrees.

Prints a Markdown table and writes bench/results/ood.json (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"non_xrays_warned": 0.99, "test_xrays_warned": 0.02}  # warn is the 99th validation percentile
ALTERED_IMAGES = 100


def altered_xrays(clf, paths: list[str]) -> dict:
    """Verdicts on test X-rays changed in ways a real upload could be: for information, not counted."""
    from chestxray.data.preprocess import decode_image, prepare_image
    from chestxray.pipeline.reference import shares

    grays = [decode_image(Path(p).read_bytes()) for p in paths]
    changes = {
        "inverted (negative)": lambda g: 255 - g,
        "upside down": lambda g: g[::-1],
        "darkened to 40%": lambda g: (g * 0.4).astype(np.uint8),
        "rotated 90 degrees": lambda g: np.ascontiguousarray(np.rot90(g)),
    }
    out = {}
    for name, change in changes.items():
        predictions = clf.predict_arrays(np.stack([prepare_image(change(g), clf.image_size) for g in grays]))
        out[name] = shares([p.verdict for p in predictions])
    return out


def non_xrays(clf) -> dict:
    """Population-check verdicts of the non-X-ray samples (read through the app's decoding and preprocessing)."""
    from chestxray.data.preprocess import decode_image, prepare_image
    from chestxray.evaluation.ood_samples import non_xray_samples
    from chestxray.pipeline.reference import shares

    samples = non_xray_samples()
    predictions = clf.predict_arrays(np.stack([prepare_image(decode_image(s.data), clf.image_size) for s in samples]))
    items = [{"name": s.name, "source": s.source, "distance": p.ood_distance, "verdict": p.verdict}
             for s, p in zip(samples, predictions)]
    by_source = {src: shares([i["verdict"] for i in items if i["source"] == src])
                 for src in dict.fromkeys(i["source"] for i in items)}
    return {**shares([i["verdict"] for i in items]), "by_source": by_source,
            "missed": [i["name"] for i in items if i["verdict"] == "accept"], "images": items}


def run(artifacts: Path, params_path: Path) -> dict:
    """The reference stage on `artifacts` into a temporary folder, timed, plus the altered X-rays."""
    import pandas as pd

    from chestxray.model.artifacts import ModelFiles
    from chestxray.model.predictor import Predictor
    from chestxray.pipeline import reference
    from chestxray.pipeline.reference import subset
    from chestxray.settings import load_params

    params = load_params(params_path, "reference") | {"max_test_images": 10**9}  # every test X-ray
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = reference.reference(params, None, artifacts / "data", artifacts / "training",
                                      artifacts / "evaluation", Path(tmp))
        stage_s = time.perf_counter() - started
        clf = Predictor.load(ModelFiles(artifacts / "training", artifacts / "evaluation", reference_dir=Path(tmp)),
                             backend="keras")
        manifest = pd.read_csv(artifacts / "data" / "manifest.csv")
        test = manifest[manifest.split == "test"]
        paths = subset([str(artifacts / "data" / p) for p in test.path], list(test.label), ALTERED_IMAGES,
                       params["seed"])
        altered = altered_xrays(clf, paths)
        summary["non_xrays"] = non_xrays(clf)
    return {"params": params, "stage_seconds": round(stage_s, 1), "reference": summary, "altered_xrays": altered}


def table(result: dict) -> str:
    ref = result["reference"]
    t = ref["thresholds"]
    lines = [f"warn threshold (validation, {ref['n_val_images']} X-rays): {t['warn_distance']:.1f}; "
             f"reference fitted on {ref['n_train_images']} train X-rays",
             "", "| images | n | accepted | warned |", "|---|---:|---:|---:|"]

    def row(label: str, s: dict) -> str:
        return f"| {label} | {s['n']} | {s['accepted']} | {s['warned']} ({100 * s['warned_share']:.1f}%) |"

    lines.append(row("validation X-rays (threshold set here)", ref["validation"]))
    lines.append(row("**test X-rays**", ref["test_xrays"]))
    lines.append(row("**non-X-rays, all**", ref["non_xrays"]))
    for source, s in ref["non_xrays"]["by_source"].items():
        lines.append(row(f"non-X-rays: {source}", s))
    for name, s in result["altered_xrays"].items():
        lines.append(row(f"test X-rays {name} (information)", s))
    non, test = ref["non_xrays"]["warned_share"], ref["test_xrays"]["warned_share"]
    lines += ["", f"non-X-rays warned {100 * non:.1f}% [goal >= 99%] "
                  f"{'OK' if non >= GOALS['non_xrays_warned'] else 'MISSED'}; "
                  f"test X-rays warned {100 * test:.2f}% [goal <= 2%] "
                  f"{'OK' if test <= GOALS['test_xrays_warned'] else 'MISSED'}",
              f"non-X-rays not warned: {', '.join(ref['non_xrays']['missed']) or 'none'}",
              f"reference stage: {result['stage_seconds']:.0f} s (load average before: {result['load_before']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ood.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not (args.artifacts / "training" / "model.keras").is_file():
        sys.exit(f"error: no trained model under {args.artifacts} -- run `dvc repro` first")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
              "artifacts": str(args.artifacts.resolve()), "load_before": load_before,
              **run(args.artifacts, args.params)}
    result["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
