"""The model card (Markdown): what the model is, what it was trained and tested on, how far to trust it.

Built only from the pipeline's own files (model_info.json, report.json, metrics.json,
thresholds.json, the robustness metrics and, when the out-of-distribution check wrote it,
reference/ood.json) and the shortcut measurements of research/04_cross_source_tb.py (their JSON,
when given), so every number in it is one the project measured.
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


TB256 = ("tb256: adult chest X-rays at 256 px from a public compilation: TB films of one unidentified hospital "
         "(`TB.N.jpg`, JPEG, often with text burned in) with that hospital's normals (`others_N.jpg`), and TB films "
         "of the Rahman et al. 2020 database (`Tuberculosis-N.png`) with adult normals of the COVID-19 Radiography "
         "Database (`Normal-N.png`); no patient ids, test and validation carved out by near-duplicate group.")


def _sources(report: dict) -> str:
    """The data sources' names and locations as one string, whatever shape report.json gives them in."""
    sources = report.get("sources", report.get("source", ""))
    if isinstance(sources, dict):
        sources = [f"{k}: {v}" for k, v in sources.items()]
    elif isinstance(sources, list):
        sources = [f"{s.get('name')}: {s.get('location')}" if isinstance(s, dict) else str(s) for s in sources]
    else:
        sources = [str(sources)]
    return "; ".join(sources)


def _is_kermany(report: dict) -> bool:
    return "kermany" in _sources(report).lower()


def _is_tb256(report: dict) -> bool:
    return "tb256" in _sources(report).lower()


def _data(report: dict) -> list[str]:
    counts = report.get("counts", {})
    classes = report.get("classes", [])
    rows = [[split, *[counts[split].get(c, 0) for c in classes], sum(counts[split].values())] for split in counts]
    overlap = report.get("patient_overlap", {})
    known = [text for test, text in ((_is_kermany, KERMANY), (_is_tb256, TB256)) if test(report)]
    source = " ".join(known) or "Describe this data set's population and sites before use."
    return ["## Data", "",
            f"Source: `{_sources(report) or 'n/a'}`. {source} Validation is carved out of train by patient; an "
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


def _per_class(metrics: dict) -> list[str]:
    per_class = metrics.get("per_class", {})
    if len(per_class) < 3:  # two classes: the performance table says it all
        return []
    rows = [[name, c.get("support"), _num(c.get("precision")), _num(c.get("recall")),
             f"{_num(c.get('recall_ci95_low'))}-{_num(c.get('recall_ci95_high'))}", _num(c.get("f1")),
             _num(c.get("roc_auc")), _num(c.get("ece"))] for name, c in per_class.items()]
    lines = ["### Per class (test)", "",
             *_table(["class", "images", "precision", "recall", "recall 95% CI", "F1", "ROC AUC (one-vs-rest)",
                      "ECE (one-vs-rest)"], rows), "",
             f"Any disease vs normal: sensitivity {_num(metrics.get('sensitivity'))} (95% CI "
             f"{_num(metrics.get('sensitivity_ci95_low'))}-{_num(metrics.get('sensitivity_ci95_high'))}), "
             f"specificity {_num(metrics.get('specificity'))} ({_num(metrics.get('specificity_ci95_low'))}-"
             f"{_num(metrics.get('specificity_ci95_high'))}); macro ROC AUC {_num(metrics.get('roc_auc_macro'))}. "
             "Intervals are 95% Wilson intervals.", ""]
    bench = metrics.get("benchmark")
    if bench:
        lines += [f"Two-class benchmark on the Kermany test images ({bench.get('n')}; NORMAL vs PNEUMONIA, "
                  f"P(PNEUMONIA) renormalised over the two): accuracy {_num(bench.get('accuracy'))}, ROC AUC "
                  f"{_num(bench.get('roc_auc'))}, sensitivity {_num(bench.get('sensitivity'))}, specificity "
                  f"{_num(bench.get('specificity'))}. The served three-class call on the same images is right for "
                  f"{_pct(bench.get('accuracy_served'))} (a TUBERCULOSIS call on a pneumonia film counts as wrong).",
                  ""]
    return lines


def _per_source(metrics: dict) -> list[str]:
    groups = metrics.get("per_collection") or metrics.get("per_source")
    if not groups:
        return []
    classes = list(metrics.get("per_class", {}))
    rows = []
    for group, entry in groups.items():
        for name in classes:
            if name in entry:
                c = entry[name]
                rows.append([group, name, c["count"], _num(c["recall"]),
                             f"{_num(c['recall_ci95_low'])}-{_num(c['recall_ci95_high'])}", _num(c.get("roc_auc"))])
    return ["## Per source (test)", "",
            "Each class within each collection: a class' ROC AUC is of P(class) against the collection's other "
            "films, so for the TB collections it is TB against normals *of the same source* (n/a where the "
            "collection holds one class).", "",
            *_table(["collection", "class", "images", "recall", "recall 95% CI", "ROC AUC"], rows), ""]


def _risks(metrics: dict, shortcuts: dict | None) -> list[str]:
    """Measured shortcut risks: adults vs children, burned-in text, PNG vs JPEG (research/04 and evaluate)."""
    probe = metrics.get("source_probe")
    if not shortcuts and not probe:
        return []
    lines = ["## Shortcut risks (measured)", "",
             "Each class and source differ in more than disease: a model can learn where a film came from. "
             "Measured, not assumed:", ""]
    if probe and "accuracy" in probe:
        aucs = ", ".join(f"{k} {_num(v, 4)}" for k, v in probe.get("roc_auc", {}).items())
        lines.append(f"- This model's features predict the collection of a validation/test film with accuracy "
                     f"{_num(probe['accuracy'])} (chance {_num(probe.get('chance_accuracy'))}; one-vs-rest ROC AUC "
                     f"{aucs}; grouped 5-fold logistic regression).")
    if shortcuts:
        feats = shortcuts.get("source_probe", {}).get("pipeline_backbone", {})
        normals, tbs = feats.get("normals_only", {}).get("roc_auc", {}), feats.get("tb_only", {}).get("roc_auc", {})
        cross = shortcuts.get("cross_collection_auc", {}).get("none", {})
        mitigation = shortcuts.get("mitigation", {})
        if normals:
            lines.append(f"- **Adults vs children**: normal films alone, the backbone's features tell the Kermany "
                         f"children from the adult normals at ROC AUC {_num(normals.get('kermany'), 4)}: pneumonia is "
                         "learned on children only, and a child/adult cue is available to the model.")
        if tbs:
            lines.append(f"- **Burned-in text, PNG vs JPEG**: TB films alone, the features tell the hospital "
                         f"collection (JPEG, text on the film) from the public one (PNG) at ROC AUC "
                         f"{_num(tbs.get('tb256/hospital'), 4)}.")
        if cross:
            rows = [[direction, *[_num(entry.get(m, {}).get("test")) for m in
                                  ("probe_xception_whole", "probe_pipeline_backbone", "pipeline_head",
                                   "pipeline_head_fine_tuned")]] for direction, entry in cross.items()]
            lines += ["- **TB across sources**: fitted on one TB collection with its own normals, tested on the "
                      "other (test half, near-duplicates of training films removed). These are research/04's own "
                      "fits of this recipe, not this model file: re-run `python research/04_cross_source_tb.py` "
                      "after changing the recipe.", "",
                      *_table(["train -> test", "whole Xception + LR", "pipeline backbone + LR", "pipeline head",
                               "pipeline head, fine-tuned"], rows), ""]
        if mitigation:
            before, after = mitigation.get("test_auc_before", {}), mitigation.get("test_auc_after", {})
            lines.append(f"- Mitigation chosen on validation: `{mitigation.get('chosen')}`; cross-source test ROC "
                         "AUC " + "; ".join(f"{k}: {_num(before.get(k))} -> {_num(after.get(k))}" for k in before)
                         + ".")
    return lines + [""]


def _calibration(metrics: dict, thresholds: dict) -> list[str]:
    val, low = metrics.get("val", {}), thresholds.get("low_confidence_rule", {})
    test_low = metrics.get("low_confidence", {})
    return ["## Calibration and thresholds", "",
            f"- Temperature scaling, fitted on validation (NLL): T = {_num(thresholds.get('temperature'))}. "
            f"ECE on test {_num(metrics.get('ece_uncalibrated'))} before, {_num(metrics.get('ece'))} after; on "
            f"validation {_num(val.get('ece_uncalibrated'))} before, {_num(val.get('ece'))} after.",
            f"- Decision threshold on P(any disease): {_num(thresholds.get('decision_threshold'))} "
            f"(Youden's J on calibrated validation probabilities); an abnormal film gets the most probable "
            f"disease class.",
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


def _not_xray(check: dict | None) -> list[str]:
    """The "not a chest X-ray" detector: held-out sources accepted, non-X-rays refused (xray_check stage)."""
    if not check:
        return []
    rows = [[name, v["n"], _num(v["accepted_share"], 4)] for name, v in check["leave_one_source_out"].items()]
    others = check["non_xrays"]
    return ["## Not a chest X-ray (refused)", "",
            f"A small detector of its own refuses what it does not take for a chest X-ray (422 `not_a_chest_xray`, "
            f"before the classifier runs); threshold {check['threshold']} on P(chest X-ray), chosen on "
            f"{check['chosen_on']}. Chest X-rays of a source the detector was not fitted on, accepted:", "",
            *_table(["held-out source", "images", "accepted"], rows), "",
            f"Images that are not chest X-rays (package photos, documents, scans of other kinds, generated; "
            f"{others['n']} with their altered copies, each scored by a detector that never saw its original): "
            f"{_num(others['refused_share'], 4)} refused. Frontal vs lateral view is not assessed (no lateral "
            "films in the data).", ""]


def _ood(ood: dict | None) -> list[str]:
    if not ood:
        return []
    from chestxray.tracking import flatten

    rows = [[k, _num(v, 4) if isinstance(v, float) else v] for k, v in flatten(ood).items()
            if isinstance(v, (int, float, str, bool))]
    intro = ("Served images whose features lie farther from the training X-rays than the warn distance (chosen "
             "on validation) get a prediction with the warning `outside_validated_population` and words saying "
             "how they differ (exposure, distance); the check never refuses an image.")
    return ["## Outside the validated population (out-of-distribution warning)", "", intro, "",
            *_table(["measure", "value"], rows), ""]


def _limitations(report: dict, info: dict, metrics: dict) -> list[str]:
    if _is_kermany(report) and _is_tb256(report):
        population = ("pediatric pneumonia and normal films from one hospital and adult TB and normal films from "
                      "other sources: no class was seen in both children and adults, so age and source are "
                      "entangled with the classes (see Shortcut risks)")
    elif _is_kermany(report):
        population = ("one pediatric data set from one hospital; adult, portable/ICU, lateral and other sites' "
                      "images are outside what was measured")
    else:
        population = "these data sets; other populations and sites are outside what was measured"
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
                      ood: dict | None = None, shortcuts: dict | None = None, xray_check: dict | None = None) -> str:
    """The model card as Markdown, from the pipeline's outputs (robustness, ood and the shortcut
    measurements of research/04_cross_source_tb.py when given)."""
    lines = ["# Model card: chestxray", "",
             "> Decision support, not a diagnosis. Every output is a probability from a model trained on one "
             "data set.", "",
             *_model(info, version), *_intended_use(), *_data(report), *_metrics(metrics), *_per_class(metrics),
             *_per_source(metrics), *_risks(metrics, shortcuts), *_calibration(metrics, thresholds),
             *_robustness(robustness, robustness_table), *_not_xray(xray_check), *_ood(ood),
             *_limitations(report, info, metrics)]
    return "\n".join(lines)
