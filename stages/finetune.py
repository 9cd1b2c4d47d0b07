"""DVC stage `finetune`: unfreeze the top of the backbone -> models/finetune.keras."""
from imgclf import tracking, training
from imgclf.datasets import load_train_val
from imgclf.modelio import load_model
from imgclf.outputs import save_training_outputs
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params)
    with tracking.stage_run("finetune", params, layout.root) as run:
        with training.strategy().scope():
            model, metadata = load_model(layout.model("head"))
        names, size = metadata["class_names"], metadata["image_size"]
        train, val = load_train_val(layout.split, size, names)
        result = training.train_finetune(model, train, val, params)
        save_training_outputs(layout, "finetune", result, params, names, size, run)


if __name__ == "__main__":
    run_stage(main)
