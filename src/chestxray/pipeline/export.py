"""Stage 5, export: convert the trained model to ONNX, check it against Keras on test images, log it.

    python -m chestxray.pipeline.export --data artifacts/data --model artifacts/training --out artifacts/export

Writes model.onnx (served by the app and the batch CLI through ONNX Runtime when present; two
outputs: probabilities and the pooled features) and check.json (max |p_onnx - p_keras| over a
stratified sample of the test split (`--max-images`), images checked, images whose predicted class
differs, largest relative feature difference). The ONNX file is written only if the check passes; otherwise the stage fails with `error: ...`. Both files
are logged to the MLflow run that train opened.
"""
from __future__ import annotations

from pathlib import Path

from chestxray.atomic import atomic_path
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config

CHECK_FILE = "check.json"


def main(argv: list[str] | None = None) -> None:
    from chestxray.model.onnx_export import TOLERANCE

    parser = StageParser(__doc__)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--model", default="artifacts/training")
    parser.add_argument("--out", default="artifacts/export")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest accepted |p_onnx - p_keras| (default {TOLERANCE:g})")
    # Agreement is a property of the conversion, not of the films: a few hundred show it, at a quarter of the time.
    parser.add_argument("--max-images", type=int, default=300,
                        help="test images to compare on, a stratified sample (default 300; 0: all)")
    args = parser.parse_args(argv)
    run_stage(lambda: export(load_config(args.config), Path(args.data), Path(args.model), Path(args.out),
                             args.tolerance, args.max_images), Path(args.out))


def split_paths(data_dir: Path, split: str = "test", limit: int = 0) -> list[str]:
    """The image files of one split, from the ingest stage's manifest; at most `limit` (0: all).

    The sample keeps each source's and class's share, seeded, so every kind of film is checked.
    """
    import pandas as pd

    from chestxray.data.split import stratified_subset

    rows = pd.read_csv(data_dir / "manifest.csv").query("split == @split")
    kind = rows.label if "source" not in rows else rows.source + "/" + rows.label
    paths = [str(data_dir / rows.path.iloc[i]) for i in stratified_subset(kind, limit, seed=0)]
    if not paths:
        raise ValueError(f"{data_dir / 'manifest.csv'} lists no {split} images to check the ONNX model on")
    return paths


def _short(path: str) -> str:
    """CLASS/file, how check.json names an image."""
    return "/".join(Path(path).parts[-2:])


def convert_and_check(model_dir: Path, paths: list[str], out: Path, tolerance: float):
    """Export model_dir's model to out/model.onnx and compare it with Keras on `paths`; returns the CheckResult.

    The file appears under its final name only after the check passes, so a bad export is never served.
    """
    from chestxray.data.dataset import image_dataset
    from chestxray.model import onnx_export as X
    from chestxray.model.build import with_features
    from chestxray.model.artifacts import ONNX_FILE, ModelFiles
    from chestxray.model.predictor import Predictor

    predictor = Predictor.load(ModelFiles(model_dir), backend="keras")
    keras_sha = predictor.keras_sha256
    final = out / ONNX_FILE
    final.unlink(missing_ok=True)  # never leave an earlier export next to a new model
    with atomic_path(final) as partial:  # removed, not published, if the check fails
        # Both outputs: the app's "not a chest X-ray" check reads the features from the same run as the probabilities.
        try:
            graph = with_features(predictor.model)
        except ValueError:  # a model not made by build_model has no features: probabilities only, the check off
            graph = predictor.model
        X.export_onnx(graph, partial, predictor.image_size, {X.META_KERAS_SHA256: keras_sha})
        runner = X.OnnxRunner.load(partial)
        # The same tf.data reader as training and evaluation; it keeps file order, so names line up with batches.
        batch = 32
        names = [[_short(p) for p in paths[i : i + batch]] for i in range(0, len(paths), batch)]
        named = ((chunk, x.numpy()) for chunk, x in zip(names, image_dataset(paths, predictor.image_size, batch)))
        result = X.check_onnx(predictor.raw_outputs, runner.run, named, tolerance)
        X.write_check(result, out / CHECK_FILE, keras_sha256=keras_sha, opset=X.OPSET)
        if not result.passed:
            raise ValueError(f"{result.failure()} (details in {out / CHECK_FILE})")
    return result


def export(config: dict, data_dir: Path, model_dir: Path, out: Path, tolerance: float, max_images: int = 0) -> None:
    """Convert, check, and log model.onnx + check.json to the pipeline's MLflow run."""
    import mlflow

    from chestxray import tracking
    from chestxray.model.artifacts import ONNX_FILE

    result = convert_and_check(model_dir, split_paths(data_dir, limit=max_images), out, tolerance)
    size_mb = (out / ONNX_FILE).stat().st_size / 2**20
    print(f"exported {out / ONNX_FILE} ({size_mb:.1f} MB): max |p_onnx - p_keras| = {result.max_abs_diff:.2e} "
          f"on {result.n_images} test images, same class on all; features within "
          f"{result.features_max_rel_diff:.1e} of their scale")
    with tracking.resume_run(config, model_dir / "mlflow_run.json"):
        mlflow.log_metrics({"export.max_abs_diff": result.max_abs_diff, "export.n_images": result.n_images})
        mlflow.log_artifact(str(out / ONNX_FILE), "export")
        mlflow.log_artifact(str(out / CHECK_FILE), "export")


if __name__ == "__main__":
    main()
