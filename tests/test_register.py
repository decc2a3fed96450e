"""The register stage and `chestxray promote`, in a real MLflow store (SQLite in a temporary folder).

The champion alias moves on validation log-loss, and only on a gain of at least register.promote_margin:
validation ROC AUC is ~0.998 for every run, so comparing it let noise pick the champion.
"""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import copy_model

NAME = "t"
MARGIN = 0.005


@pytest.fixture
def store(tmp_path, monkeypatch) -> dict:
    """config pointing at a fresh SQLite store (MLFLOW_TRACKING_URI unset so the config decides)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.end_run()
    return {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t",
                       "registered_model": NAME}}


@pytest.fixture
def artifacts(tiny_exported, tmp_path):
    """The tiny model's training/, evaluation/, export/ and data/, plus a stand-in reference/ (only logged here)."""
    root = copy_model(tiny_exported, tmp_path / "artifacts", ("training", "evaluation", "export", "data"))
    (root / "reference").mkdir()
    (root / "reference" / "ood.json").write_text("{}")
    (root / "reference" / "reference.npz").write_bytes(b"stand-in")
    (root / "evaluation" / "model_card.md").write_text("# Model card: tiny\n")
    return root


def _register(root, config, val_log_loss: float) -> dict:
    from chestxray.pipeline import register

    metrics = {"accuracy": 0.5, "roc_auc": 0.998, "val": {"roc_auc": 0.998, "log_loss": val_log_loss}}
    (root / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    return register.register({"promote_margin": MARGIN}, config, root / "data", root / "training",
                             root / "evaluation", root / "export", root / "reference", root / "registry")


@pytest.mark.slow  # four real registrations, each logging the model to MLflow
def test_champion_moves_only_on_a_clear_log_loss_gain(artifacts, store, capsys):
    import mlflow
    from mlflow import MlflowClient

    def champion() -> str:
        return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)

    first = _register(artifacts, store, 0.300)
    assert first["promoted"] and first["reason"] == "no champion yet" and first["champion_before"] is None
    assert json.loads((artifacts / "registry" / "registered.json").read_text()) == first
    assert f"registered {NAME} version {first['version']}: champion (no champion yet)" in capsys.readouterr().out
    mlflow.set_tracking_uri(store["mlflow"]["tracking_uri"])
    assert champion() == first["version"]
    # The version's run holds what serving downloads with it: the export and the reference.
    run_files = {a.path for folder in ("export", "reference", "evaluation")
                 for a in MlflowClient().list_artifacts(first["run_id"], folder)}
    assert {"export/model.onnx", "reference/ood.json", "reference/reference.npz",
            "evaluation/model_card.md"} <= run_files
    # ... kept beside the store's database, not in ./mlruns of whatever folder the stage ran in.
    store_folder = store["mlflow"]["tracking_uri"].removeprefix("sqlite:///").removesuffix("/mlflow.db")
    assert mlflow.get_run(first["run_id"]).info.artifact_uri.startswith(f"file://{store_folder}/mlruns/")

    worse = _register(artifacts, store, 0.400)
    assert not worse["promoted"] and worse["champion_before"] == first["version"]
    assert worse["champion_val_log_loss"] == pytest.approx(0.300) and "not lower by the margin" in worse["reason"]
    assert "champion unchanged" in capsys.readouterr().out
    within_margin = _register(artifacts, store, 0.300 - MARGIN / 2)
    assert not within_margin["promoted"]
    mlflow.set_tracking_uri(store["mlflow"]["tracking_uri"])
    assert champion() == first["version"]

    better = _register(artifacts, store, 0.300 - 2 * MARGIN)
    assert better["promoted"] and better["champion_before"] == first["version"]
    assert len({first["version"], worse["version"], within_margin["version"], better["version"]}) == 4
    mlflow.set_tracking_uri(store["mlflow"]["tracking_uri"])
    assert champion() == better["version"]
    tags = MlflowClient().get_model_version(NAME, better["version"]).tags
    assert tags["promoted_by"] == "register stage" and "below champion" in tags["promotion_reason"]
    assert float(tags["val_log_loss"]) == pytest.approx(0.290)


def test_register_refuses_metrics_without_validation_log_loss(artifacts, store):
    from chestxray.pipeline import register

    (artifacts / "evaluation" / "metrics.json").write_text(json.dumps({"val": {"roc_auc": 0.99}}))
    with pytest.raises(ValueError, match="val.log_loss"):
        register.register({"promote_margin": MARGIN}, store, artifacts / "data", artifacts / "training",
                          artifacts / "evaluation", artifacts / "export", artifacts / "reference",
                          artifacts / "registry")


def test_promotion_rule():
    from chestxray.tracking import promotion_decision

    assert promotion_decision(0.5, None, MARGIN, champion=None) == (True, "no champion yet")
    assert promotion_decision(0.2, 0.2 + MARGIN, MARGIN, champion="3")[0]
    assert not promotion_decision(0.2, 0.2 + MARGIN / 2, MARGIN, champion="3")[0]
    assert not promotion_decision(0.3, 0.2, MARGIN, champion="3")[0]
    promoted, reason = promotion_decision(0.3, None, MARGIN, champion="3")  # champion from the ROC AUC days
    assert promoted and "no validation log-loss" in reason


def test_cli_promote_moves_the_alias_and_records_who(store, tmp_path, capsys):
    import mlflow
    from mlflow import MlflowClient

    from chestxray.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(store))
    mlflow.set_tracking_uri(store["mlflow"]["tracking_uri"])
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, source=str(tmp_path))
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_model_version_tag(NAME, "1", "val_log_loss", "0.25")

    assert main(["promote", "2", "--reason", "reviewed the card", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{NAME} version 2 is now champion" in out and "previous champion: version 1" in out
    assert "0.2500" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion_reason"] == "reviewed the card" and "chestxray promote" in tags["promoted_by"]
    assert tags["promoted_at"]

    assert main(["promote", "9", "--config", str(config)]) == 1  # no such version: one line, alias unchanged
    assert "cannot promote" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
