"""Stage 3, train: fit the classifier on the train split, pick the best epoch on validation, save it.

    python -m chestxray.pipeline.train --data artifacts/data --base-model artifacts/base_model --out artifacts/training

Opens the MLflow run for this pipeline run (evaluate joins it) and logs params, data digest and
per-epoch metrics. `train.mode` (chestxray.model.distribute.training_mode) picks how: on cached activations
of the frozen bottom of the backbone (the CPU default; chestxray.model.training says why), or end to end
on images augmented afresh every epoch in the tf.data pipeline (the default on GPUs).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from chestxray.atomic import atomic_path, leftover_name, remove_dead_leftovers, write_json
from chestxray.pipeline.common import StageParser, run_stage
from chestxray.settings import load_config, load_params

CHECKPOINT = ".best"  # the best epoch's weights while a phase trains (see _fit)


def main(argv: list[str] | None = None) -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data", default="artifacts/data")
    parser.add_argument("--base-model", default="artifacts/base_model")
    parser.add_argument("--out", default="artifacts/training")
    args = parser.parse_args(argv)
    run_stage(lambda: train(load_params(args.params), load_config(args.config), Path(args.data),
                            Path(args.base_model), Path(args.out)), Path(args.out))


def _fit(model, train_ds, val_ds, epochs: int, optimizer, loss, phase: str, history: list, patience: int,
         work: Path, class_weight=None) -> None:
    """Compile and fit one phase, keep the best epoch by validation AUC, and log every epoch to MLflow.

    The best epoch's weights wait in `work` under a name carrying this process id, so a killed
    run's checkpoint is recognised and removed by the next run (remove_dead_leftovers).
    """
    import keras
    import mlflow

    from chestxray.model.training import EpochLogger

    if epochs <= 0:
        return
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy", keras.metrics.AUC(name="auc")])
    best = work / leftover_name(CHECKPOINT, ".weights.h5")
    try:
        model.fit(
            train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight, verbose=2,
            shuffle=False,  # the datasets shuffle themselves (arrays_dataset, image_dataset); Keras would only warn
            callbacks=[
                keras.callbacks.ModelCheckpoint(best, monitor="val_auc", mode="max", save_best_only=True,
                                                save_weights_only=True),
                keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience),
                EpochLogger(phase, history, lambda row, step: mlflow.log_metrics(
                    {k: v for k, v in row.items() if k not in ("phase", "epoch")}, step=step)),
            ],
        )
        model.load_weights(best)
    finally:
        best.unlink(missing_ok=True)


def _check_features_vary(pooled: np.ndarray, base_params: dict) -> None:
    """Fail when the frozen backbone gives every image the same features: the head could only learn
    the class prior. It happens with `base_model.weights: none`, where the untrained bottom's
    activations vanish (~1e-10 at the cut) and round to zero in the float16 cache."""
    import numpy as np

    if np.isfinite(pooled).all() and float(pooled.std(axis=0).max()) > 0.0:
        return
    raise RuntimeError(f"the frozen backbone ({base_params['backbone']}, weights {base_params['weights']!r}) gives "
                       "every training image the same features, so nothing can be learnt from them: set "
                       "base_model.weights to pretrained weights (imagenet or a .weights.h5 file)")


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _worker_scratch() -> Iterator[Path]:
    """A non-chief worker's output folder and MLflow store: a temporary folder, deleted afterwards.

    Every worker runs the same code (the collective ops need them all), but only the chief's outputs
    are kept: the others write theirs here and discard them, as Keras' multi-worker guide advises.
    MLFLOW_TRACKING_URI points MLflow at the scratch store: it takes precedence over the config
    (chestxray.tracking.tracking_uri).
    """
    with tempfile.TemporaryDirectory(prefix="chestxray-worker-") as temp:
        before = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(temp) / 'mlflow.db'}"
        try:
            yield Path(temp) / "training"
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


def train(params: dict, config: dict, data_dir: Path, base_dir: Path, out: Path) -> None:
    """Train the head, fine-tune the top of the backbone (train.mode: on cached activations or end to end),
    save model + info + history.

    Where it runs (strategy, precision, global batch, scaled learning rates) is decided first, by
    chestxray.model.distribute.choose; a non-chief worker of a multi-machine run writes nothing that lasts.
    """
    from chestxray.model.distribute import choose

    placement = choose(params["train"])  # first: before any model is loaded and before any other TF op
    if placement.is_chief:
        _train(params, config, data_dir, base_dir, out, placement)
        return
    with _worker_scratch() as scratch:
        _train(params, config, data_dir, base_dir, scratch, placement)


@dataclass
class _Job:
    """What both ways of training share: the data, the loss, the phases' settings and where results go."""

    tp: dict
    bp: dict
    strategy: object  # tf.distribute.Strategy
    paths: dict[str, list[str]]  # "train", "val" -> image files
    labels: dict[str, np.ndarray]  # "train", "val" -> class indices
    num_classes: int
    size: int
    batch: int  # global
    head_lr: float  # scaled (Placement.scaled_lr)
    fine_tune_lr: float
    loss: object
    weights: dict | None  # class weights
    history: list
    out: Path

    def phase(self, phase: str, model, train_ds, val_ds, steps_per_epoch: int = 0) -> None:
        """Fit phase "head" (Adam at the head lr) or "fine_tune" (cosine decay from the fine-tune lr)."""
        import keras

        epochs = self.tp[f"{phase}_epochs"]
        with self.strategy.scope():
            if phase == "head":
                optimizer = keras.optimizers.Adam(self.head_lr)
            else:
                steps = steps_per_epoch * max(epochs, 1)
                optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(self.fine_tune_lr, steps))
            _fit(model, train_ds, val_ds, epochs, optimizer, self.loss, phase, self.history, self.tp["patience"],
                 self.out, self.weights)


def _fit_cached(job: _Job, split) -> dict[str, float]:
    """train.mode cached: run the frozen bottom once (plus augment_views augmented copies), then both phases
    on its cached activations (chestxray.model.training). Returns the time spent caching, for MLflow."""
    import numpy as np

    from chestxray.data.dataset import image_dataset
    from chestxray.model import training as T

    tp, paths, batch = job.tp, job.paths, job.batch
    started = time.perf_counter()
    shape = tuple(split.bottom.output.shape[1:])
    n_train, n_views = len(paths["train"]), 1 + tp["augment_views"]
    val_x = T.cache_activations(split.bottom, image_dataset(paths["val"], job.size, batch),
                                np.empty((len(paths["val"]), *shape), np.float16), "caching val")
    # All views of the train set in one preallocated array: view 0 as is, then augmented copies.
    train_x = np.empty((n_train * n_views, *shape), np.float16)
    for view in range(n_views):
        augment = T.augmentation(tp["augment"], seed=tp["seed"] + view - 1) if view else None
        T.cache_activations(split.bottom, image_dataset(paths["train"], job.size, batch, augment),
                            train_x[view * n_train:(view + 1) * n_train],
                            f"caching train, view {view + 1} of {n_views}")
    train_y = np.tile(job.labels["train"], n_views)
    cache_s = time.perf_counter() - started
    print(f"cached activations {train_x.shape} (train, {n_views} views) "
          f"and {val_x.shape} (val) in {cache_s:.0f}s; peak memory {_peak_rss_mb():.0f} MB", flush=True)
    n, val_y = job.num_classes, job.labels["val"]

    # Phase 1: head only, on pooled features of the frozen top (seconds per epoch).
    T.set_fine_tuning(split, False)
    pooled_train = T.run_in_batches(split.pooled, train_x, 64)
    pooled_val = T.run_in_batches(split.pooled, val_x, 64)
    print(f"pooled features {pooled_train.shape}; peak memory {_peak_rss_mb():.0f} MB", flush=True)
    _check_features_vary(pooled_train, job.bp)
    job.phase("head", split.head, T.arrays_dataset(pooled_train, train_y, n, batch, tp["seed"]),
              T.arrays_dataset(pooled_val, val_y, n, batch))

    # Phase 2: unfreeze the layers above the cut and fine-tune them with the head.
    T.set_fine_tuning(split, True)
    job.phase("fine_tune", split.top, T.arrays_dataset(train_x, train_y, n, batch, tp["seed"]),
              T.arrays_dataset(val_x, val_y, n, batch), steps_per_epoch=-(-len(train_x) // batch))
    return {"time.cache_s": cache_s}


def _fit_end_to_end(job: _Job, model, split) -> dict[str, float]:
    """train.mode end_to_end: both phases train the whole `model` on images, the train images augmented
    afresh every epoch inside the tf.data pipeline; what is frozen is what the cached path freezes."""
    import keras

    from chestxray.data.dataset import image_dataset
    from chestxray.model import training as T

    tp, paths, n = job.tp, job.paths, job.num_classes
    onehot = {s: keras.utils.to_categorical(y, n) for s, y in job.labels.items()}
    train_ds = image_dataset(paths["train"], job.size, job.batch, T.augmentation(tp["augment"], seed=tp["seed"]),
                             onehot["train"], shuffle_seed=tp["seed"])
    val_ds = image_dataset(paths["val"], job.size, job.batch, labels=onehot["val"])

    # Phase 1: the head, the whole backbone frozen. Phase 2: the layers above the cut with the head.
    T.set_end_to_end_fine_tuning(model, split, False)
    job.phase("head", model, train_ds, val_ds)
    T.set_end_to_end_fine_tuning(model, split, True)
    job.phase("fine_tune", model, train_ds, val_ds, steps_per_epoch=-(-len(paths["train"]) // job.batch))
    return {}


def _train(params: dict, config: dict, data_dir: Path, base_dir: Path, out: Path, placement) -> None:
    """The train stage's body under a chosen `placement` (chestxray.model.distribute.Placement)."""
    import keras
    import mlflow
    import numpy as np
    import pandas as pd

    import chestxray.model.layers  # noqa: F401  (registers PixelScaling for loading)
    from chestxray import tracking
    from chestxray.model import training as T
    from chestxray.model.backbones import get_backbone, resolve
    from chestxray.model.artifacts import INFO_FILE, MODEL_FILE
    from chestxray.model.distribute import END_TO_END, FLOAT32, with_precision

    tp, bp = params["train"], params["base_model"]
    keras.utils.set_random_seed(tp["seed"])
    report = json.loads((data_dir / "report.json").read_text())
    # Each step takes `batch` images, split over the replicas; one replica: train.batch_size as before.
    classes, size, batch = report["classes"], bp["image_size"], placement.global_batch
    manifest = pd.read_csv(data_dir / "manifest.csv")
    splits = {s: manifest[manifest.split == s] for s in ("train", "val")}
    paths = {s: [str(data_dir / p) for p in rows.path] for s, rows in splits.items()}
    labels = {s: np.array([classes.index(c) for c in rows.label]) for s, rows in splits.items()}
    truncate_before, fine_tune_from = resolve(bp["backbone"], bp.get("truncate_before", "auto"), tp["fine_tune_from"])

    out.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out, CHECKPOINT)
    strategy = placement.strategy
    with tracking.start_run(config, out / "mlflow_run.json", run_name=f"{bp['backbone']}-{size}px"):
        mlflow.log_params(tracking.flatten({k: params[k] for k in ("data", "base_model", "train")}))
        mlflow.log_params({"data.sha256": report["dataset_sha256"], "data.n_train": len(labels["train"]),
                           "data.n_val": len(labels["val"]), "train.fine_tune_from_layer": fine_tune_from})
        mlflow.log_params(placement.mlflow_params({"head_lr": tp["head_lr"], "fine_tune_lr": tp["fine_tune_lr"]}))
        mlflow.log_artifact(str(data_dir / "report.json"), "data")
        print(f"training with {placement.strategy_class} strategy on {placement.replicas} {placement.accelerator} "
              f"replica(s), {placement.precision}, global batch {batch}, {placement.mode}", flush=True)
        with strategy.scope():
            # The .keras file fixes each layer's dtype policy: rebuilt under the chosen one (no-op in float32).
            model = with_precision(keras.saving.load_model(base_dir / "base_model.keras", compile=False),
                                   placement.precision)
            split = T.split_model(model, fine_tune_from)

        started = time.perf_counter()
        n = len(classes)
        job = _Job(tp, bp, strategy, paths, labels, n, size, batch, placement.scaled_lr(tp["head_lr"]),
                   placement.scaled_lr(tp["fine_tune_lr"]), T.make_loss(tp["loss"], tp.get("focal_gamma", 2.0)),
                   T.class_weights(labels["train"], n) if tp["loss"] == "weighted_ce" else None, [], out)
        if placement.mode == END_TO_END:
            timings = _fit_end_to_end(job, model, split)
        else:
            timings = _fit_cached(job, split)
        history = job.history
        train_s = time.perf_counter() - started
        print(f"peak memory after fine-tuning {_peak_rss_mb():.0f} MB", flush=True)

        with atomic_path(out / MODEL_FILE) as temp:
            # Served in float32 on CPUs (the app, the ONNX export): mixed precision's weights are float32 already.
            with strategy.scope():
                with_precision(model, FLOAT32).save(temp)
        write_json(out / "history.json", history)
        with atomic_path(out / "history.csv") as temp:
            pd.DataFrame(history).to_csv(temp, index=False)
        info = {
            "classes": classes,
            "normal_class": params["data"].get("normal_class", "NORMAL") if "NORMAL" in classes else None,
            "image_size": size,
            "backbone": bp["backbone"],
            "truncate_before": truncate_before,
            "fine_tune_from": fine_tune_from,
            "preprocessing": {"color": "grayscale, repeated to 3 channels", "resize": "area, aspect ratio not kept",
                              "input_range": [0, 255], "pixel_scaling": get_backbone(bp["backbone"]).scaling},
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset_sha256": report["dataset_sha256"],
            "mlflow_run_id": mlflow.active_run().info.run_id,
        }
        write_json(out / INFO_FILE, info)  # last: its presence means the training output is complete
        mlflow.log_metrics({**timings, "time.train_s": train_s, "memory.peak_rss_mb": _peak_rss_mb()})
        mlflow.log_artifact(str(out / "history.csv"), "training")
        print(f"trained in {train_s:.0f}s; best val_auc {max(h.get('val_auc', 0) for h in history):.4f} "
              f"-> {out / MODEL_FILE}")


if __name__ == "__main__":
    main()
