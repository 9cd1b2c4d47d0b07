"""DVC stage `export`: the fine-tuned model as SavedModel + TFLite, with a parity check."""
import numpy as np

from imgclf.data.store import open_split
from imgclf.model.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.serve.export import export_all
from imgclf.track import tracking

PARITY_IMAGES = 16


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    with tracking.stage_run("export", params, layout.root) as run:
        model, info = load_model(layout.model("finetune"))
        test = open_split(layout.model_store("finetune"), "test", info.image_size)
        pick = np.linspace(0, len(test) - 1, min(PARITY_IMAGES, len(test))).astype(int)
        report = export_all(model, info, layout.models / "export", params.export.quantization,
                            test.read(pick).astype(np.float32))
        write_json(layout.summary("export"), report)
        run.log_metrics({f"{fmt}_{k}": v for fmt, values in report.items() for k, v in values.items()})
    return export_line(report)


def export_line(report: dict) -> str:
    """``export: saved_model 19.2 MB, tflite_float32 8.4 MB, ...; top-1 as Keras on every checked image``"""
    formats = {fmt: values for fmt, values in report.items() if "size_mb" in values}
    sizes = ", ".join(f"{fmt} {values['size_mb']:.1f} MB" for fmt, values in formats.items())
    agreement = min((values.get("top1_agreement", 1.0) for values in formats.values()), default=1.0)
    worst = max((values.get("max_abs_diff_vs_keras", 0.0) for values in formats.values()), default=0.0)
    same = "the same top-1 as Keras" if agreement == 1.0 else f"top-1 agreeing with Keras on {agreement:.1%}"
    return f"export: {sizes}; {same} on the checked images (probabilities within {worst:.1e})"


if __name__ == "__main__":
    run_stage(main)
