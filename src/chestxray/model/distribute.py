"""Where the train stage runs: the tf.distribute strategy, the precision policy, the batch and learning rates.

One decision, made once at the start of the stage by `choose` from params.yaml (train.accelerator,
train.mixed_precision, train.mode), the devices TensorFlow finds and TF_CONFIG:

- TF_CONFIG naming more than one task: MultiWorkerMirroredStrategy (several machines, docs/pipeline.md);
- else several devices of the chosen kind (GPUs, or logical CPU devices in tests): MirroredStrategy;
- else TensorFlow's default strategy (one CPU or one GPU): exactly what training did before.

`train.batch_size` is per replica: the global batch is batch_size x replicas, and the learning rates are
scaled linearly with it (lr x replicas, Goyal et al. 2017), so a run on one replica is unchanged.

`train.mode` is how the backbone is trained (`training_mode`): on cached activations of its frozen bottom
(the CPU's way, chestxray.model.training) or end to end with augmentation in the input pipeline (GPUs').
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from chestxray.model.build import PROBABILITIES

ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "on", "off")
CACHED, END_TO_END = "cached", "end_to_end"
MODES = ("auto", CACHED, END_TO_END)
MIXED, FLOAT32 = "mixed_float16", "float32"
# Layers build_model keeps in float32 whatever the policy: softmax probabilities in float16 lose precision.
FLOAT32_LAYERS = frozenset({PROBABILITIES})


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3's fit() hands it.

    fit() reduces the first (x, y) batch as one nested structure, and each epoch's scalar logs with
    axis=0; the multi-worker strategy reduces one tensor at a time and fails on both ("Attempt to convert
    a value (PerReplica...)", "Invalid reduction dimension 0 for input with 0 dimensions";
    keras-team/keras#20585). Reducing each tensor, scalars without an axis, is what MirroredStrategy does.
    """

    def reduce(self, reduce_op, value, axis):
        def one(tensor):
            rank = self.experimental_local_results(tensor)[0].shape.rank
            return super(_MultiWorkerMirroredStrategy, self).reduce(reduce_op, tensor, axis if rank else None)

        return tf.nest.map_structure(one, value)


@dataclass(frozen=True)
class Placement:
    """Where and how training runs, as decided by `choose`; logged to MLflow by the train stage."""

    strategy: tf.distribute.Strategy
    strategy_class: str  # "default", "MirroredStrategy" or "MultiWorkerMirroredStrategy"
    accelerator: str  # "cpu" or "gpu"
    precision: str  # the Keras dtype policy: "float32" or "mixed_float16"
    replicas: int  # devices training in lockstep, on all machines together
    workers: int  # machines (processes) taking part
    is_chief: bool  # the one worker that logs to MLflow and writes the outputs
    per_replica_batch: int
    mode: str  # CACHED or END_TO_END: see training_mode

    @property
    def global_batch(self) -> int:
        return self.per_replica_batch * self.replicas

    def scaled_lr(self, lr: float) -> float:
        """Linear scaling: `replicas` times the batch takes `replicas` times the step."""
        return lr * self.replicas

    def mlflow_params(self, learning_rates: dict[str, float]) -> dict[str, object]:
        """Every tf.distribute choice, named for MLflow; `learning_rates` are the params' unscaled values."""
        return {"distribute.strategy": self.strategy_class, "distribute.accelerator": self.accelerator,
                "distribute.replicas": self.replicas, "distribute.workers": self.workers,
                "distribute.per_replica_batch": self.per_replica_batch, "distribute.global_batch": self.global_batch,
                "distribute.precision_policy": self.precision, "distribute.lr_rule": "linear: lr x replicas",
                "distribute.mode": self.mode,
                **{f"distribute.scaled_{k}": self.scaled_lr(v) for k, v in learning_rates.items()}}


def choose(train_params: dict) -> Placement:
    """Pick device, strategy and precision from the params and what is there; set the global dtype policy.

    Call it first, before any model is loaded or built and before any other TensorFlow op:
    MultiWorkerMirroredStrategy must be created before the runtime starts, and layers take the
    global policy when they are made.
    """
    wanted = str(train_params.get("accelerator", "auto")).lower()
    precision_param = str(train_params.get("mixed_precision", "auto")).lower()
    mode_param = str(train_params.get("mode", "auto")).lower()
    if wanted not in ACCELERATORS:
        raise ValueError(f"train.accelerator is {wanted!r}: use one of {', '.join(ACCELERATORS)}")
    if precision_param not in PRECISIONS:
        raise ValueError(f"train.mixed_precision is {precision_param!r}: use one of {', '.join(PRECISIONS)}")
    accelerator = _accelerator(wanted)
    mode = training_mode(mode_param, accelerator)
    precision = MIXED if precision_param == "on" or (precision_param == "auto" and accelerator == "gpu") else FLOAT32
    keras.mixed_precision.set_global_policy(precision)
    strategy, name, workers, is_chief = _strategy(accelerator)
    return Placement(strategy, name, accelerator, precision, strategy.num_replicas_in_sync, workers, is_chief,
                     int(train_params["batch_size"]), mode)


def training_mode(wanted: str, accelerator: str) -> str:
    """How the train stage trains the backbone: CACHED or END_TO_END, the one place `train.mode` is decided.

    auto: end to end on GPUs, where a forward pass through the whole backbone every step is cheap and fresh
    augmentation every epoch is worth it; cached on the CPU, where the frozen bottom is run once and the
    remaining epochs take seconds (chestxray.model.training).
    """
    if wanted not in MODES:
        raise ValueError(f"train.mode is {wanted!r}: use one of {', '.join(MODES)}")
    if wanted != "auto":
        return wanted
    return END_TO_END if accelerator == "gpu" else CACHED


def _accelerator(wanted: str) -> str:
    """'cpu' or 'gpu'. With 'cpu' the GPUs are hidden (before TensorFlow starts) so no op lands on one."""
    gpus = tf.config.list_physical_devices("GPU")  # does not start the runtime
    if wanted == "gpu" and not gpus:
        raise RuntimeError("train.accelerator is 'gpu' but TensorFlow finds no GPU: install the GPU build "
                           "(make setup GPU=1) on a machine with an NVIDIA driver (check nvidia-smi), "
                           "or set train.accelerator to auto or cpu")
    if wanted == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    return "gpu" if wanted != "cpu" and gpus else "cpu"


def cluster_size(tf_config: str | None = None) -> int:
    """Tasks (machines) named in TF_CONFIG's cluster; 0 when it is unset."""
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster': {raw[:200]!r}") from None
    return sum(len(tasks) for role, tasks in cluster.items() if role in ("chief", "worker"))


def _strategy(accelerator: str) -> tuple[tf.distribute.Strategy, str, int, bool]:
    """(strategy, its name, workers, is this process the chief)."""
    workers = cluster_size()
    if workers > 1:
        strategy = _MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        # Keras' rule: the "chief" task if there is one, else worker 0.
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        is_chief = resolver.task_type == "chief" or (not has_chief and resolver.task_id == 0)
        return strategy, "MultiWorkerMirroredStrategy", workers, is_chief
    devices = tf.config.list_logical_devices(accelerator.upper())
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices]), "MirroredStrategy", 1, True
    return tf.distribute.get_strategy(), "default", 1, True


def with_precision(model: keras.Model, policy: str) -> keras.Model:
    """The same network and weights with every layer under `policy` (FLOAT32_LAYERS stay float32).

    Keras 3 writes each layer's dtype policy into the .keras file, so a model loaded after
    set_global_policy keeps the policies it was saved with: it has to be rebuilt from its config.
    Returns `model` itself when nothing changes (the float32 CPU path stays exactly as it was).
    Call it under the strategy's scope, so that the new variables are mirrored.
    """
    if all(layer.dtype_policy.name == _policy_for(layer.name, policy) for layer in _all_layers(model)):
        return model
    config = _retag(model.get_config(), policy)
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _policy_for(name: str, policy: str) -> str:
    return FLOAT32 if name in FLOAT32_LAYERS else policy


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer, nested models' layers included (InputLayers hold no policy that matters)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += _all_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def _retag(node, policy: str):
    """A model config with each layer's "dtype" set to `policy`; inputs keep their tensor dtype."""
    if isinstance(node, list):
        return [_retag(item, policy) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _retag(value, policy) for key, value in node.items()}
    config = node.get("config")
    if "class_name" in node and isinstance(config, dict) and "dtype" in config and node["class_name"] != "InputLayer":
        node["config"] = {**config, "dtype": _policy_for(config.get("name", ""), policy)}
    return node
