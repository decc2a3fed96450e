"""The model card: what it says, the stage that writes it, and the app serving it."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from chestxray.evaluation.model_card import render_model_card
from chestxray.pipeline.model_card import write_model_card
from chestxray.serving import create_app
from helpers import ROOT, copy_model

INFO = {"classes": ["NORMAL", "PNEUMONIA"], "normal_class": "NORMAL", "image_size": 224, "backbone": "xception",
        "truncate_before": "block11_sepconv1_act", "fine_tune_from": "block9_sepconv1_act",
        "trained_at": "2026-01-01T00:00:00+00:00", "dataset_sha256": "064659ad5189c59f", "mlflow_run_id": "abc"}
REPORT = {"classes": ["NORMAL", "PNEUMONIA"], "rejected": [], "source": "../shared/data/kermany224",
          "counts": {"train": {"NORMAL": 1122, "PNEUMONIA": 3055}, "val": {"NORMAL": 124, "PNEUMONIA": 342},
                     "test": {"NORMAL": 234, "PNEUMONIA": 390}},
          "patient_overlap": {"policy": "drop", "patients": 264, "images_dropped": 551}}
METRICS = {"accuracy": 0.912, "roc_auc": 0.969, "sensitivity": 0.977, "specificity": 0.803, "f1_macro": 0.9,
           "ece": 0.041, "ece_uncalibrated": 0.091, "temperature": 1.7, "n_test": 624,
           "val": {"accuracy": 0.99, "roc_auc": 0.998, "ece": 0.01, "ece_uncalibrated": 0.02},
           "low_confidence": {"flagged_share": 0.08, "accuracy_flagged": 0.6, "accuracy_not_flagged": 0.94}}
THRESHOLDS = {"decision_threshold": 0.62, "low_confidence": 0.81, "temperature": 1.7, "tta": False,
              "low_confidence_rule": {"target_accuracy": 0.9, "flagged_share": 0.03,
                                      "case": "threshold between the last confidence under the target and ..."}}
ROBUSTNESS = {"n_images": 200, "n_test": 624, "backend": "onnx",
              "worst_accuracy_drop": {"variant": "clahe_s2", "drop": 0.085, "ci95": [0.04, 0.13]},
              "worst_roc_auc_drop": {"variant": "gaussian_noise_s2", "drop": 0.031}}
TABLE = [{"variant": "clean", "setting": "as acquired", "severity": 0, "accuracy": 0.9, "roc_auc": 0.97, "ece": 0.05,
          "sensitivity": 0.99, "specificity": 0.8, "accuracy_drop": float("nan")},
         {"variant": "clahe_s2", "setting": "4", "severity": 2, "accuracy": 0.815, "roc_auc": 0.95, "ece": 0.1,
          "sensitivity": 0.98, "specificity": 0.6, "accuracy_drop": 0.085}]


def test_card_holds_data_use_metrics_calibration_robustness_and_limits():
    card = render_model_card(INFO, "sha256:0123456789ab", REPORT, METRICS, THRESHOLDS, ROBUSTNESS, TABLE)
    assert "not a diagnosis" in card.lower() and "## Intended use" in card and "## Limitations" in card
    assert "`sha256:0123456789ab`" in card and "xception" in card and "224 x 224" in card
    assert "| test | 234 | 390 | 624 |" in card and "| train | 1122 | 3055 | 4177 |" in card
    assert "pediatric patients aged one to five" in card and "one pediatric data set" in card
    assert "Test accuracy (0.912) is below validation accuracy (0.990)" in card
    assert "| test | 624 | 0.912 | 0.969 | 0.977 | 0.803 |" in card
    assert "T = 1.700" in card and "0.091 before, 0.041 after" in card
    assert "Decision threshold on P(any disease): 0.620" in card
    assert "Low-confidence threshold: 0.810" in card and "under 90.0%" in card and "8.0% of test" in card
    assert "**0.085** (clahe_s2" in card and "| clahe_s2 | 4 | 0.815 | 0.950 | 0.100 | 0.980 | 0.600 | 0.085 |" in card
    assert "| clean | as acquired | 0.900 | 0.970 | 0.050 | 0.990 | 0.800 |  |" in card
    assert "out-of-distribution" not in card.lower()


def test_card_without_robustness_says_so_and_includes_ood_figures_when_given():
    ood = {"validation": {"warned_share": 0.0125}, "thresholds": {"warn_distance": 12.5}, "n_val_images": 120}
    other = {**REPORT, "source": "/data/hospital-b"}
    card = render_model_card(INFO, "sha256:0", other, METRICS, THRESHOLDS, ood=ood)
    assert "Kermany" not in card and "pediatric" not in card and "`/data/hospital-b`" in card
    assert "## Robustness\n\nNot measured" in card
    assert "## Outside the validated population (out-of-distribution warning)" in card
    assert "`outside_validated_population`" in card and "never refuses" in card
    assert "| validation.warned_share | 0.0125 |" in card and "| thresholds.warn_distance | 12.5000 |" in card
    assert "| n_val_images | 120 |" in card


THREE = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def _cls(recall, n, auc):
    return {"precision": 0.9, "recall": recall, "f1": 0.9, "roc_auc": auc, "support": n, "ece": 0.02,
            "recall_ci95_low": recall - 0.05, "recall_ci95_high": min(recall + 0.03, 1.0)}


METRICS3 = {**METRICS, "roc_auc_macro": 0.97, "sensitivity_ci95_low": 0.95, "sensitivity_ci95_high": 0.99,
            "specificity_ci95_low": 0.75, "specificity_ci95_high": 0.85,
            "per_class": {"NORMAL": _cls(0.8, 400, 0.96), "PNEUMONIA": _cls(0.97, 390, 0.97),
                          "TUBERCULOSIS": _cls(0.96, 403, 0.995)},
            "per_collection": {"tb256/hospital": {"n": 350, "accuracy": 0.9,
                                                  "TUBERCULOSIS": {"count": 300, "recall": 0.97, "recall_ci95_low": 0.94,
                                                                   "recall_ci95_high": 0.98, "roc_auc": 0.981},
                                                  "NORMAL": {"count": 50, "recall": 0.7, "recall_ci95_low": 0.56,
                                                             "recall_ci95_high": 0.81, "roc_auc": 0.902}},
                               "kermany": {"n": 624, "accuracy": 0.9,
                                           "PNEUMONIA": {"count": 390, "recall": 0.97, "recall_ci95_low": 0.95,
                                                         "recall_ci95_high": 0.98, "roc_auc": 0.96}}},
            "benchmark": {"n": 624, "accuracy": 0.905, "roc_auc": 0.962, "sensitivity": 0.97, "specificity": 0.78,
                          "accuracy_served": 0.899},
            "source_probe": {"n": 900, "accuracy": 0.991, "chance_accuracy": 0.4,
                             "roc_auc": {"kermany": 0.9999, "tb256/hospital": 0.998, "tb256/public": 0.997}}}
SHORTCUTS = {"source_probe": {"pipeline_backbone": {"normals_only": {"roc_auc": {"kermany": 0.9997}},
                                                    "tb_only": {"roc_auc": {"tb256/hospital": 0.998}}}},
             "cross_collection_auc": {"none": {"tb256/hospital -> tb256/public": {
                 "probe_xception_whole": {"test": 0.84}, "probe_pipeline_backbone": {"test": 0.86},
                 "pipeline_head": {"test": 0.87}, "pipeline_head_fine_tuned": {"test": 0.88}}}},
             "mitigation": {"chosen": "equalise", "test_auc_before": {"tb256/hospital -> tb256/public": 0.87},
                            "test_auc_after": {"tb256/hospital -> tb256/public": 0.9}}}


def test_three_class_card_has_per_class_per_source_benchmark_and_measured_risks():
    info = {**INFO, "classes": THREE}
    report = {**REPORT, "classes": THREE, "source": None,
              "sources": [{"name": "kermany", "location": "../shared/data/kermany224"},
                          {"name": "tb256", "location": "../shared/data/tb256"}]}
    card = render_model_card(info, "sha256:0", report, METRICS3, THRESHOLDS, shortcuts=SHORTCUTS)
    assert "kermany: ../shared/data/kermany224; tb256: ../shared/data/tb256" in card
    assert "pediatric patients aged one to five" in card and "`TB.N.jpg`" in card
    assert "| TUBERCULOSIS | 403 | 0.900 | 0.960 | 0.910-0.990 | 0.900 | 0.995 | 0.020 |" in card
    assert "sensitivity 0.977 (95% CI 0.950-0.990)" in card
    assert "Two-class benchmark on the Kermany test images (624" in card and "accuracy 0.905" in card
    assert "| tb256/hospital | TUBERCULOSIS | 300 | 0.970 | 0.940-0.980 | 0.981 |" in card
    assert "**Adults vs children**" in card and "ROC AUC 0.9997" in card
    assert "**Burned-in text, PNG vs JPEG**" in card and "ROC AUC 0.9980" in card
    assert "| tb256/hospital -> tb256/public | 0.840 | 0.860 | 0.870 | 0.880 |" in card
    assert "research/04's own fits of this recipe, not this model file" in card
    assert "`equalise`" in card and "0.870 -> 0.900" in card
    assert "accuracy 0.991 (chance 0.400" in card
    assert "age and source are entangled" in card



def test_the_pipelines_card_carries_the_committed_cross_source_measurement():
    import shlex

    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["model_card"]
    args = shlex.split(stage["cmd"])
    shortcuts = args[args.index("--shortcuts") + 1]
    assert shortcuts in stage["deps"]  # a re-run of research/04 re-renders the card
    results = json.loads((ROOT / shortcuts).read_text())
    card = render_model_card({**INFO, "classes": THREE}, "sha256:0", {**REPORT, "classes": THREE}, METRICS3,
                             THRESHOLDS, shortcuts=results)
    auc = results["cross_collection_auc"]["none"]["tb256/public -> tb256/hospital"]["pipeline_head"]["test"]
    assert "**TB across sources**" in card and f"{auc:.3f}" in card

def test_two_class_card_has_no_three_class_sections():
    card = render_model_card(INFO, "sha256:0", REPORT, METRICS, THRESHOLDS)
    assert "### Per class" not in card and "## Per source" not in card and "Shortcut risks" not in card


@pytest.fixture(scope="module")
def carded(tiny_artifacts, tmp_path_factory):
    """tiny_artifacts with pipeline-shaped report, metrics, thresholds, robustness and a card the stage wrote."""
    root = copy_model(tiny_artifacts, tmp_path_factory.mktemp("carded"))
    (root / "data").mkdir()
    (root / "data" / "report.json").write_text(json.dumps(REPORT))
    (root / "evaluation" / "metrics.json").write_text(json.dumps(METRICS))
    (root / "evaluation" / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    (root / "robustness").mkdir()
    (root / "robustness" / "metrics.json").write_text(json.dumps(ROBUSTNESS))
    pd.DataFrame(TABLE).to_csv(root / "robustness" / "table.csv", index=False)
    path = write_model_card(root / "data", root / "training", root / "evaluation", root / "robustness",
                            root / "reference")
    assert path == root / "evaluation" / "model_card.md"
    return root


def test_stage_writes_the_card_from_the_pipeline_files(carded):
    card = (carded / "evaluation" / "model_card.md").read_text()
    assert "mobilenetv2" in card  # the real model_info.json of the tiny model
    assert "T = 1.700" in card and "**0.085** (clahe_s2" in card
    assert "| clean | as acquired | 0.900 | 0.970 | 0.050 | 0.990 | 0.800 |  |" in card  # NaN drop of the clean row read back
    assert "Outside the validated population" not in card  # no reference/ood.json: no section


def test_stage_fails_clearly_without_evaluate_outputs(tiny_artifacts, tmp_path):
    root = copy_model(tiny_artifacts, tmp_path, ("training",))
    (root / "data").mkdir()
    (root / "data" / "report.json").write_text(json.dumps(REPORT))
    with pytest.raises(FileNotFoundError, match="metrics.json not found"):
        write_model_card(root / "data", root / "training", root / "evaluation", root / "robustness",
                         root / "reference")


@pytest.fixture(scope="module")
def client(carded):
    return create_app({"CHESTXRAY_ARTIFACTS": str(carded), "GEMINI_API_KEY": ""}).test_client()


def test_card_served_as_markdown_and_as_html(client, carded):
    markdown = client.get("/model/card")
    assert markdown.status_code == 200 and markdown.mimetype == "text/markdown"
    assert markdown.get_data(as_text=True) == (carded / "evaluation" / "model_card.md").read_text()
    html = client.get("/model/card", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert html.status_code == 200 and html.mimetype == "text/html"
    page = html.get_data(as_text=True)
    assert "<h1>Model card: chestxray</h1>" in page and "<table>" in page and "<td>clahe_s2</td>" in page
    assert client.get("/model/card?format=html").get_data(as_text=True) == page
    assert client.get("/model/card?format=md", headers={"Accept": "text/html"}).mimetype == "text/markdown"


def test_card_link_on_the_page_and_in_model_info(client):
    info = client.get("/model/info").get_json()
    assert info["model_card"] == "/model/card"
    assert info["thresholds"]["temperature"] == 1.7
    assert info["low_confidence_rule"]["target_accuracy"] == 0.9
    assert 'id="model-card-link" href="/model/card?format=html"' in client.get("/").get_data(as_text=True)


def test_raw_html_in_a_card_is_shown_as_text(tiny_artifacts):
    client = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": ""}).test_client()
    page = client.get("/model/card?format=html").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_no_card_is_a_json_404_and_no_link(tiny_artifacts, tmp_path):
    root = copy_model(tiny_artifacts, tmp_path)
    (root / "evaluation" / "model_card.md").unlink()
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""}).test_client()
    response = client.get("/model/card")
    assert response.status_code == 404
    assert response.get_json()["error"] == "no_model_card" and "model_card stage" in response.get_json()["message"]
    assert client.get("/model/info").get_json()["model_card"] is None
    assert "model-card-link" not in client.get("/").get_data(as_text=True)


def test_unknown_card_format_is_a_400(client):
    response = client.get("/model/card?format=pdf")
    assert response.status_code == 400 and response.get_json()["error"] == "bad_format"


def test_card_reports_the_not_a_chest_xray_detector_per_held_out_source():
    check = {"threshold": 0.26, "chosen_on": "out-of-fold scores, leaving one source out (never the test split)",
             "leave_one_source_out": {"kermany": {"n": 2500, "accepted_share": 0.9964},
                                      "tb256/hospital/TUBERCULOSIS": {"n": 1782, "accepted_share": 0.9141}},
             "non_xrays": {"n": 3286, "refused_share": 0.9833}}
    card = render_model_card(INFO, "sha256:0", {}, METRICS, THRESHOLDS, xray_check=check)
    section = card.split("## Not a chest X-ray (refused)")[1].split("\n## ")[0]
    assert "| tb256/hospital/TUBERCULOSIS | 1782 | 0.9141 |" in section and "0.9833 refused" in section
    assert "lateral view is not assessed" in section
    assert "## Not a chest X-ray" not in render_model_card(INFO, "sha256:0", {}, METRICS, THRESHOLDS)
