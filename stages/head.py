"""DVC stage `head`: frozen backbone, train the classification head -> models/head.keras."""
from imgclf import tracking, training
from imgclf.datasets import class_names, load_subset
from imgclf.outputs import save_training_outputs
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params)
    size = params.model.image_size
    with tracking.stage_run("head", params, layout.root) as run:
        names = class_names(layout.split)
        train = load_subset(layout.split, "train", size, names)
        val = load_subset(layout.split, "val", size, names)
        result = training.train_head(train, val, params)
        save_training_outputs(layout, "head", result, params, names, size, run)


if __name__ == "__main__":
    run_stage(main)
