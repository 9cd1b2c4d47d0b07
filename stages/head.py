"""DVC stage `head`: frozen backbone, train the classification head -> models/head.keras."""
from imgclf import tracking, training
from imgclf.datasets import load_train_val
from imgclf.outputs import save_training_outputs
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params)
    with tracking.stage_run("head", params, layout.root) as run:
        train, val = load_train_val(layout.split, params.model.image_size)
        result = training.train_head(train, val, params)
        save_training_outputs(layout, "head", result, params, train.class_names, params.model.image_size, run)


if __name__ == "__main__":
    run_stage(main)
