"""DVC stage `evaluate`: every model on the test split -> headline metrics (test accuracy and macro F1),
all numbers and diagnostics in reports/evaluate, plots, comparison."""
import json
from pathlib import Path

from imgclf.data.store import open_split
from imgclf.model.modelio import read_metadata
from imgclf.params import MODEL_NAMES, load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.serve import evaluation as ev
from imgclf.serve import reporting
from imgclf.serve.inference import predict_probs
from imgclf.serve.saved import load_runner
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    reports, plots = layout.reports("evaluate"), layout.plots("evaluate")
    with tracking.stage_run("evaluate", params, layout.root) as run:
        results, diagnostics = {}, {}
        for name in MODEL_NAMES:
            info = read_metadata(layout.model(name))
            test = open_split(layout.model_store(name), "test", info.image_size)  # streamed from disk
            if name == MODEL_NAMES[0]:
                run.log_split(layout.root, layout.split, {"test": len(test)}, "evaluation")
            # LiteRT on a CPU, without TensorFlow where the training stage recorded the model's conversion
            runner = load_runner(layout.model(name), len(test) * (2 if info.tta else 1), test)
            probs, images_per_s = ev.timed_predictions(lambda x: predict_probs(runner, x, info.tta), test)
            assessment = ev.assess(ev.Predictions(probs, test.labels, info.class_names),
                                   ev.uncalibrated(probs, info.temperature), info.temperature, test.paths,
                                   params.evaluate)
            results[name] = {**assessment.metrics, "throughput_images_per_s": round(images_per_s, 2),
                             "params_total": runner.parameters,
                             "model_file_mb": round(layout.model(name).stat().st_size / 2**20, 3)}
            diagnostics[name] = assessment.diagnostics(params.evaluate.f1_threshold)
            reporting.write_model_report(name, assessment, reports, plots, layout.root)
            run.log_metrics({f"{name}_{k}": v for k, v in results[name].items() if v is not None}, parent=True)
            results[name]["runtime"] = runner.report
        write_json(layout.headline_metrics, ev.headline_metrics(results))
        write_json(layout.summary("evaluate"), results)
        write_json(reports / "diagnostics.json", diagnostics)
        trained = {name: json.loads(layout.summary(name).read_text())
                   for name in MODEL_NAMES if layout.summary(name).exists()}
        reporting.write_comparison(ev.comparison_rows(results, trained), reports)
        run.log_artifacts(reports, "reports")
        run.log_artifacts(plots, "plots")
    return evaluate_line(results, reports.relative_to(layout.root) / "comparison.md")


def evaluate_line(results: dict, comparison: Path) -> str:
    """``evaluate: test accuracy baseline 0.8155, head 0.9280, finetune 0.9760 (macro F1 0.9759); comparison in ...``"""
    accuracies = ", ".join(f"{name} {numbers['accuracy']:.4f}" for name, numbers in results.items())
    last = results[MODEL_NAMES[-1]]
    return f"evaluate: test accuracy {accuracies} (macro F1 {last['macro_f1']:.4f}); comparison in {comparison}"


if __name__ == "__main__":
    run_stage(main)
