"""DVC stage `evaluate`: every model on the test split -> headline metrics (test accuracy and macro F1),
all numbers and diagnostics in reports/evaluate, plots, comparison."""
import csv
import json

from imgclf import evaluation as ev
from imgclf.calibration import uncalibrated
from imgclf import figures, tracking
from imgclf.inference import predict_probs
from imgclf.modelio import load_model
from imgclf.params import MODEL_NAMES, load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.store import open_split


def write_predictions(path, pred: ev.Predictions, paths: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for file, actual, predicted, conf in zip(paths, pred.labels, pred.predicted, pred.confidence):
            writer.writerow([file, pred.class_names[actual], pred.class_names[predicted], f"{conf:.4f}"])


def evaluate_model(name, layout, config, logged, run) -> tuple[dict, dict]:
    model, info = load_model(layout.model(name))
    names = info.class_names
    test = open_split(layout.model_store(name), "test", info.image_size)  # streamed from disk
    if not logged:
        run.log_split(layout.root, layout.split, {"test": len(test)}, "evaluation")
        logged.append(name)
    probs, images_per_s = ev.timed_predictions(lambda x: predict_probs(model, x, info.tta), test)
    pred = ev.Predictions(probs, test.labels, names)
    metrics = ev.summary_metrics(pred, config.calibration_bins)
    before = uncalibrated(probs, info.temperature)
    metrics["ece_uncalibrated"] = ev.expected_calibration_error(before, test.labels, config.calibration_bins)
    metrics["temperature"] = info.temperature
    metrics["throughput_images_per_s"] = round(images_per_s, 2)
    metrics["params_total"] = int(model.count_params())
    metrics["model_file_mb"] = round(layout.model(name).stat().st_size / 2**20, 3)

    rows = ev.per_class(pred)
    matrix = ev.confusion(pred)
    reports, plots = layout.reports("evaluate"), layout.plots("evaluate")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{name}_classification_report.txt").write_text(ev.classification_report(pred))
    (reports / f"{name}_per_class.md").write_text(ev.markdown_table(rows))
    write_predictions(plots / f"{name}_predictions.csv", pred, test.paths)
    figures.confusion_heatmap(matrix, names, plots / f"{name}_confusion.png", f"{name}: normalized confusion")
    curves = {}
    for c, label in enumerate(names):
        if (test.labels == c).any() and (test.labels != c).any():
            fpr, tpr, _ = ev.skm.roc_curve(test.labels == c, probs[:, c])
            curves[label] = (fpr, tpr, ev.skm.auc(fpr, tpr))
    figures.roc_curves(curves, plots / f"{name}_roc.png", f"{name}: one-vs-rest ROC")
    bins = config.calibration_bins
    figures.reliability_diagram(
        {f"uncalibrated, ECE {metrics['ece_uncalibrated']:.3f}": ev.reliability_bins(before, test.labels, bins),
         f"served (T = {info.temperature:.3g}), ECE {metrics['ece']:.3f}": ev.reliability_bins(probs, test.labels, bins)},
        plots / f"{name}_reliability.png", f"{name}: reliability on the test split")
    wrong = ev.confidently_wrong(pred, config.gallery_size)
    figures.image_grid(
        [(layout.root / test.paths[i], f"true {names[test.labels[i]]}\npred {names[pred.predicted[i]]} "
                         f"{pred.confidence[i]:.2f}") for i in wrong],
        plots / f"{name}_most_confident_errors.png", columns=4,
        title=f"{name}: most confidently wrong test images" + ("" if len(wrong) else " (none)"))
    diagnostics = {
        "per_class": rows,
        "most_confused_pairs": ev.most_confused_pairs(matrix, names),
        "weak_classes": ev.weak_classes(rows, config.f1_threshold),
        "most_confident_errors": [{"path": test.paths[i], "actual": names[test.labels[i]],
                                   "predicted": names[pred.predicted[i]],
                                   "confidence": round(float(pred.confidence[i]), 4)} for i in wrong],
    }
    run.log_metrics({f"{name}_{k}": v for k, v in metrics.items() if v is not None}, parent=True)
    return metrics, diagnostics


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    with tracking.stage_run("evaluate", params, layout.root) as run:
        results, diagnostics, logged = {}, {}, []
        for name in MODEL_NAMES:
            results[name], diagnostics[name] = evaluate_model(name, layout, params.evaluate, logged, run)
        write_json(layout.headline_metrics, ev.headline_metrics(results))
        write_json(layout.summary("evaluate"), results)
        reports = layout.reports("evaluate")
        write_json(reports / "diagnostics.json", diagnostics)
        trained = {name: json.loads(layout.summary(name).read_text())
                   for name in MODEL_NAMES if layout.summary(name).exists()}
        rows = ev.comparison_rows(results, trained)
        (reports / "comparison.md").write_text(
            "# Baseline vs transfer learning\n\n" + ev.markdown_table(rows) + "\n" + ev.comparison_summary(rows))
        with (reports / "comparison.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        run.log_artifacts(reports, "reports")
        run.log_artifacts(layout.plots("evaluate"), "plots")
    print((reports / "comparison.md").read_text())


if __name__ == "__main__":
    run_stage(main)
