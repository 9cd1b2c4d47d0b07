"""DVC stage `weights`: the backbone's ImageNet weights fetched into Keras' cache. It comes first in
dvc.yaml, so DVC runs it before any stage trains and a run without them stops in seconds."""
from imgclf.model.weights import fetch_weights
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage, write_json
from imgclf.track import tracking


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    info = fetch_weights(params.model)  # before the MLflow run: a missing file is not a failed run
    with tracking.stage_run("weights", params, layout.root) as run:
        write_json(layout.summary("weights"), info)
        run.log_metrics({"backbone_parameters": info["parameters"]})
    weights = {"none": "random weights (model.weights: none)", "imagenet": "ImageNet weights"}.get(
        info["weights"], f"{info['weights']} weights")
    return f"weights: {info['backbone']} with {weights}, {info['parameters']:,} parameters"


if __name__ == "__main__":
    run_stage(main)
