"""DVC stage `finetune`: unfreeze the top of the backbone -> models/finetune.keras."""
import dataclasses

from imgclf import calibration, tracking, training
from imgclf.datasets import load_train_val
from imgclf.modelio import load_model
from imgclf.outputs import save_training_outputs
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params.seed, params.train)
    with tracking.stage_run("finetune", params, layout.root) as run:
        with training.strategy().scope():
            model, head_info = load_model(layout.model("head"))
        calibration.fold_temperature(model, 1 / head_info.temperature)  # fine-tune the head's own logits
        # backbone, classes and input size come from the head model, not from params
        train, val = load_train_val(layout.split, head_info.image_size, head_info.class_names)
        run.log_split(layout.root, layout.split, {"train": len(train), "val": len(val)}, "training")
        result = training.train_finetune(model, train, val, params.finetune, params.train, params.augment,
                                         params.seed, on_epoch=run.log_epoch)
        temperature = training.calibrate(result, val, params.train.calibrate)
        info = dataclasses.replace(head_info, stage="finetune", tta=params.train.tta, temperature=temperature)
        save_training_outputs(layout, result, info, run, val.images[:1], params.mlflow.registered_model)


if __name__ == "__main__":
    run_stage(main)
