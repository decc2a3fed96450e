"""The model card (Markdown): what the model is, what it was trained and tested on, how far to trust it.

Built only from the pipeline's own files (model_info.json, report.json, metrics.json,
thresholds.json, the robustness metrics and, when the out-of-distribution check wrote it,
reference/ood.json), so every number in it is one the pipeline measured.
"""
from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _model(info: dict, version: str) -> list[str]:
    return ["## Model", "",
            f"- Version: `{version}` (SHA-256 prefix of model.keras)",
            f"- Backbone: {info.get('backbone')} (cut before `{info.get('truncate_before')}`, "
            f"fine-tuned from `{info.get('fine_tune_from')}`), softmax head",
            f"- Input: {info.get('image_size')} x {info.get('image_size')} px, grayscale repeated to 3 channels, "
            f"resized without keeping the aspect ratio (the shared preprocessing of training and serving)",
            f"- Classes: {', '.join(info.get('classes', []))}; \"no finding\" class: {info.get('normal_class')}",
            f"- Trained: {info.get('trained_at')}; dataset SHA-256 `{str(info.get('dataset_sha256'))[:12]}`; "
            f"MLflow run `{info.get('mlflow_run_id')}`", ""]


def _intended_use() -> list[str]:
    return ["## Intended use", "",
            "Decision support for clinicians reading frontal chest X-rays: it draws attention to images the "
            "model scores as abnormal. **It is not a diagnosis** and must not be used without a qualified reader. "
            "Not for triage without review, not for screening populations, not for patients unlike the training "
            "data (see Data) without local validation.",
            ""]


# What is known about the default data set; another source gets its path and a prompt to describe it.
KERMANY = ("Kermany et al. 2018 (Guangzhou Women and Children's Medical Center): anterior-posterior chest X-rays "
           "of pediatric patients aged one to five, from one hospital.")


def _is_kermany(report: dict) -> bool:
    return "kermany" in str(report.get("source", "")).lower()


def _data(report: dict) -> list[str]:
    counts = report.get("counts", {})
    classes = report.get("classes", [])
    rows = [[split, *[counts[split].get(c, 0) for c in classes], sum(counts[split].values())] for split in counts]
    overlap = report.get("patient_overlap", {})
    source = KERMANY if _is_kermany(report) else "Describe this data set's population and sites before use."
    return ["## Data", "",
            f"Source: `{report.get('source', 'n/a')}`. {source} Validation is carved out of train by patient; an "
            "official test split is kept as released.", "",
            *_table(["split", *classes, "total"], rows), "",
            f"Rejected files: {len(report.get('rejected', []))}. Train images of patients who also appear in "
            f"test: {overlap.get('images_dropped', 0)} ({overlap.get('patients', 0)} patients), "
            f"policy `{overlap.get('policy', 'n/a')}`.", ""]


def _metrics(metrics: dict) -> list[str]:
    val = metrics.get("val", {})
    rows = [["test", metrics.get("n_test"), _num(metrics.get("accuracy")), _num(metrics.get("roc_auc")),
             _num(metrics.get("sensitivity")), _num(metrics.get("specificity")), _num(metrics.get("f1_macro")),
             _num(metrics.get("ece"))],
            ["validation", "", _num(val.get("accuracy")), _num(val.get("roc_auc")), "", "", "", _num(val.get("ece"))]]
    return ["## Performance", "",
            *_table(["split", "images", "accuracy", "ROC AUC", "sensitivity", "specificity", "F1 (macro)", "ECE"],
                    rows), "",
            "Sensitivity and specificity are for \"any disease\" against the normal class, at the decision "
            "threshold chosen on validation. ECE is of the served (calibrated) confidence.", ""]


def _calibration(metrics: dict, thresholds: dict) -> list[str]:
    val, low = metrics.get("val", {}), thresholds.get("low_confidence_rule", {})
    test_low = metrics.get("low_confidence", {})
    return ["## Calibration and thresholds", "",
            f"- Temperature scaling, fitted on validation (NLL): T = {_num(thresholds.get('temperature'))}. "
            f"ECE on test {_num(metrics.get('ece_uncalibrated'))} before, {_num(metrics.get('ece'))} after; on "
            f"validation {_num(val.get('ece_uncalibrated'))} before, {_num(val.get('ece'))} after.",
            f"- Decision threshold on P(any disease): {_num(thresholds.get('decision_threshold'))} "
            f"(Youden's J on calibrated validation probabilities).",
            f"- Low-confidence threshold: {_num(thresholds.get('low_confidence'))}, the confidence below which "
            f"validation accuracy falls under {_pct(low.get('target_accuracy'))} ({low.get('case', 'n/a')}). "
            f"Flagged: {_pct(low.get('flagged_share'))} of validation, {_pct(test_low.get('flagged_share'))} of test "
            f"(test accuracy flagged {_pct(test_low.get('accuracy_flagged'))}, not flagged "
            f"{_pct(test_low.get('accuracy_not_flagged'))}).",
            f"- Test-time augmentation when thresholds were chosen: {'on' if thresholds.get('tta') else 'off'}.", ""]


def _robustness(robustness: dict | None, table: list[dict] | None) -> list[str]:
    if not robustness:
        return ["## Robustness", "", "Not measured (run the robustness stage).", ""]
    worst, auc = robustness["worst_accuracy_drop"], robustness["worst_roc_auc_drop"]
    lines = ["## Robustness", "",
             f"On {robustness['n_images']} of {robustness['n_test']} test images (stratified, seeded), each "
             f"corruption applied to the decoded image before preprocessing. Worst accuracy drop: "
             f"**{_num(worst['drop'])}** ({worst['variant']}, paired 95% CI {_num(worst['ci95'][0])} to "
             f"{_num(worst['ci95'][1])}); worst ROC AUC drop: {_num(auc['drop'])} ({auc['variant']}).", ""]
    if table:
        rows = [[r["variant"], r.get("setting", ""), _num(r["accuracy"]), _num(r["roc_auc"]), _num(r["ece"]),
                 _num(r.get("sensitivity")), _num(r.get("specificity")),
                 "" if r["variant"] == "clean" else _num(r.get("accuracy_drop"))]
                for r in table]
        lines += [*_table(["setting", "value", "accuracy", "ROC AUC", "ECE", "sensitivity", "specificity",
                           "accuracy drop"], rows), ""]
    return lines


def _ood(ood: dict | None) -> list[str]:
    if not ood:
        return []
    from chestxray.tracking import flatten

    rows = [[k, _num(v, 4) if isinstance(v, float) else v] for k, v in flatten(ood).items()
            if isinstance(v, (int, float, str, bool))]
    return ["## Not a chest X-ray (out-of-distribution check)", "", *_table(["measure", "value"], rows), ""]


def _limitations(report: dict, info: dict, metrics: dict) -> list[str]:
    population = ("one pediatric data set from one hospital; adult, portable/ICU, lateral and other sites' images "
                  "are outside what was measured" if _is_kermany(report) else "one data set; other populations "
                  "and sites are outside what was measured")
    lines = ["## Limitations", "", f"- Trained and tested on {population}.",
             f"- Only these classes: {', '.join(info.get('classes', []))}; other findings are not recognised and "
             "will be called one of them."]
    val, test = metrics.get("val", {}).get("accuracy"), metrics.get("accuracy")
    if val is not None and test is not None and val - test > 0.02:
        lines.append(f"- Test accuracy ({test:.3f}) is below validation accuracy ({val:.3f}): the test split "
                     "differs from the training distribution, and other data will differ more.")
    return lines + [
        "- Calibration and thresholds were fitted on validation images from the training distribution; "
        "confidence on other populations is not calibrated by construction.",
        "- Grad-CAM heatmaps show what the model used, not where the disease is.",
        "- Robustness figures come from a subset of the test split: differences of a few points are within noise.",
        ""]


def render_model_card(info: dict, version: str, report: dict, metrics: dict, thresholds: dict,
                      robustness: dict | None = None, robustness_table: list[dict] | None = None,
                      ood: dict | None = None) -> str:
    """The model card as Markdown, from the pipeline's outputs (robustness and ood sections when given)."""
    lines = ["# Model card: chestxray", "",
             "> Decision support, not a diagnosis. Every output is a probability from a model trained on one "
             "data set.", "",
             *_model(info, version), *_intended_use(), *_data(report), *_metrics(metrics),
             *_calibration(metrics, thresholds), *_robustness(robustness, robustness_table), *_ood(ood),
             *_limitations(report, info, metrics)]
    return "\n".join(lines)
