"""The `chestxray` command: one subcommand per task (`chestxray <command> --help`).

    chestxray predict scans/ extra.dcm --out results.csv --heatmaps heatmaps/
    chestxray promote 7 --reason "reviewed the card"      # move the registry's champion alias by hand
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from chestxray.logs import quiet_libraries
from chestxray.model.network import BACKENDS  # no TensorFlow at import time: --help stays fast

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm"}


def iter_images(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """(path, name for the heatmap file) for each image file given or found recursively under a folder."""
    for path in map(Path, paths):
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                yield found, "__".join(found.relative_to(path).with_suffix("").parts)
        else:
            yield path, path.stem


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_command(args: argparse.Namespace) -> int:
    """Predict every image under the given paths into a CSV, in batches; optional Grad-CAM PNGs."""
    from tqdm import tqdm

    from chestxray.model.artifacts import ModelNotFound
    from chestxray.model.predictor import Predictor

    files = list(iter_images(args.paths))  # paths only; images are read one batch at a time
    missing = [str(p) for p, _ in files if not p.exists()]
    if missing:
        print(f"chestxray: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        predictor = Predictor.from_artifacts(args.artifacts, backend=args.backend, tta=args.tta)
    except (ModelNotFound, ValueError, RuntimeError) as exc:  # no model, bad backend, unloadable model.onnx
        print(f"chestxray: {exc}", file=sys.stderr)
        return 1
    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    if heatmaps:
        heatmaps.mkdir(parents=True, exist_ok=True)
    columns = ["file", "predicted_class", "confidence", *[f"p_{c}" for c in predictor.classes], "low_confidence",
               "warnings", "warning_messages", "ood_distance", "xray_score", "error"]
    used_names: set[str] = set()
    errors = 0
    with open(args.out, "w", newline="") as out, tqdm(total=len(files), unit="image", file=sys.stderr) as bar:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for batch in _batches(files, args.batch_size):
            # The app's rules: the same acceptance checks, and the same warnings with their words.
            for (path, name), result in zip(batch, predictor.predict_images([path for path, _ in batch]), strict=True):
                if result.error is not None:
                    errors += 1
                    distance = result.prediction.ood_distance if result.prediction is not None else None
                    writer.writerow({"file": str(path), "ood_distance": distance, "error": result.error.message})
                    continue
                writer.writerow(_row(path, result.prediction))
                if heatmaps:
                    _write_heatmap(predictor, result.image, result.prediction.predicted_class, heatmaps,
                                   _unique(name, used_names))
            bar.update(len(batch))
    print(f"{len(files) - errors} predicted, {errors} unreadable or refused -> {args.out}", file=sys.stderr)
    return 0


def _row(path: Path, prediction) -> dict:
    row = {"file": str(path), "predicted_class": prediction.predicted_class,
           "confidence": f"{prediction.confidence:.6f}", "low_confidence": prediction.low_confidence,
           "warnings": ";".join(prediction.warnings), "warning_messages": warning_messages_cell(prediction),
           "ood_distance": prediction.ood_distance, "xray_score": prediction.xray_score, "error": ""}
    row.update({f"p_{c}": f"{p:.6f}" for c, p in prediction.probabilities.items()})
    return row


def warning_messages_cell(prediction) -> str:
    """The CSV cell for a prediction's warnings in words: "code: words; code: words" ("" without warnings)."""
    return "; ".join(f"{code}: {words}" for code, words in prediction.warning_messages.items())


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def _write_heatmap(predictor, gray, class_name: str, folder: Path, name: str) -> None:
    from chestxray.explain.gradcam import explain

    (folder / f"{name}.gradcam.png").write_bytes(explain(predictor, gray, class_name).png())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="chestxray", description="Chest X-ray classification (decision support).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(sub)
    _add_promote(sub)
    _add_stages(sub)
    return parser


PIPELINE_STAGES = ("ingest", "prepare_base_model", "train", "evaluate", "reference", "export", "robustness",
                   "model_card", "register")


def _add_stages(sub) -> None:
    """`chestxray train ...` runs the same stage as dvc.yaml does (`python -m chestxray.pipeline.train ...`)."""
    for stage in PIPELINE_STAGES:
        # Listed for --help; main() hands their arguments to the stage's own parser untouched.
        sub.add_parser(stage.replace("_", "-"), help=f"run the {stage} pipeline stage (prefer `dvc repro`)")


def _run_stage(stage: str, stage_args: list[str]) -> int:
    from importlib import import_module

    import_module(f"chestxray.pipeline.{stage}").main(stage_args)
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict images or folders into a CSV",
                       description="Predict every .jpg/.jpeg/.png/.dcm file given, or found under given folders.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--heatmaps", metavar="DIR", help="also write a Grad-CAM overlay PNG per image into DIR")
    p.add_argument("--artifacts", default="artifacts", help="the pipeline's artifacts folder (default: artifacts)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per model call (default: 16)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): ONNX Runtime if artifacts/export/model.onnx is there, else Keras")
    p.add_argument("--tta", action="store_true",
                   help="average each prediction over test-time augmentation views (flip, shifts; 4x slower)")
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's and other libraries' log lines and warnings")
    p.set_defaults(handler=predict_command)


def promote_command(args: argparse.Namespace) -> int:
    """Make VERSION the champion, recording who did it and why on the version; print the previous champion."""
    import getpass

    import mlflow

    from chestxray import tracking
    from chestxray.settings import load_config

    config = load_config(args.config)
    name = args.name or config["mlflow"]["registered_model"]
    mlflow.set_tracking_uri(tracking.tracking_uri(config))
    before = tracking.champion_version(name)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment
        user = "unknown"
    try:
        previous = tracking.set_champion(name, args.version, by=f"{user} (chestxray promote)",
                                         reason=args.reason or "promoted by hand")
    except mlflow.exceptions.MlflowException as exc:
        print(f"chestxray: cannot promote {name} version {args.version}: {exc.message}", file=sys.stderr)
        return 1
    loss = before.tags.get(tracking.VAL_LOG_LOSS_TAG) if before is not None else None
    was = "no champion before" if previous is None else (
        f"previous champion: version {previous}" + (f" (validation log-loss {float(loss):.4f})" if loss else ""))
    print(f"{name} version {args.version} is now {tracking.CHAMPION}, by {user}; {was}")
    return 0


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="make a registered model version the champion (by hand)",
                       description="Move the registry's champion alias to VERSION, overriding the register stage's "
                                   "rule; who, when and why are tagged on the version (docs/tracking.md).")
    p.add_argument("version", metavar="VERSION", help="the registered model version, e.g. 7")
    p.add_argument("--reason", help="why, recorded on the version (tag promotion_reason)")
    p.add_argument("--name", help="registered model name (default: config's mlflow.registered_model)")
    p.add_argument("--config", default="config/config.yaml")
    p.set_defaults(handler=promote_command, tensorflow=False)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the arguments and run the chosen subcommand's handler."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].replace("-", "_") in PIPELINE_STAGES:
        return _run_stage(argv[0].replace("-", "_"), argv[1:])
    args = build_parser().parse_args(argv)
    quiet_libraries(getattr(args, "verbose", False), getattr(args, "tensorflow", True))  # before the handler imports TF
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
