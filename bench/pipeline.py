"""Time a full `dvc repro` from nothing, stage by stage, and report the test metrics it reached.

    python bench/pipeline.py            # from the project root, with the venv active

Each stage is forced (`dvc repro --force --single-item <stage>`) in pipeline order, so the sum is
the time of a complete rebuild. Peak memory is the largest resident set of any stage's process.
Writes bench/results/pipeline.json and prints a Markdown table for README.md.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

STAGES = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])  # written in pipeline order


def run_stage(stage: str) -> tuple[float, float]:
    """Run one stage through DVC; return (seconds, peak RSS of the children so far in MiB)."""
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "--force", "--single-item", stage], check=True)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak_mib


def main() -> None:
    rows = []
    for stage in STAGES:
        seconds, peak = run_stage(stage)
        rows.append({"stage": stage, "seconds": round(seconds, 1), "peak_rss_mib_so_far": round(peak)})
        print(f"== {stage}: {seconds:.0f} s", flush=True)
    metrics = json.loads(Path("artifacts/evaluation/metrics.json").read_text())
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "stages": rows,
        "total_seconds": round(sum(r["seconds"] for r in rows), 1),
        "test": {k: metrics[k] for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "ece", "n_test")},
        "threshold": metrics["threshold"],
    }
    out = Path("bench/results/pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| stage | seconds |\n|---|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.0f} |")
    print(f"| **total** | **{result['total_seconds']:.0f}** ({result['total_seconds'] / 60:.1f} min) |")
    print("\n" + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["test"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
