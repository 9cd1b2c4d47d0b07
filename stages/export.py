"""DVC stage `export`: the fine-tuned model as SavedModel + TFLite, with a parity check."""
import numpy as np

from imgclf import tracking
from imgclf.export import export_all
from imgclf.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.store import open_split

PARITY_IMAGES = 16


def main() -> None:
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
    for fmt, values in report.items():
        print(f"export {fmt}: {values}")


if __name__ == "__main__":
    run_stage(main)
