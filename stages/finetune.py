"""DVC stage `finetune`: unfreeze the top of the backbone -> models/finetune.keras."""
import dataclasses

from imgclf.data.store import open_split
from imgclf.model.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.track import tracking
from imgclf.train import calibration, distributed, training
from imgclf.train.activations import open_activations
from imgclf.train.outputs import save_training_outputs


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params.seed, params.train)
    with tracking.stage_run("finetune", params, layout.root) as run, layout.scratch() as workdir:
        with distributed.strategy().scope():
            model, head_info = load_model(layout.model("head"))
        calibration.fold_temperature(model, 1 / head_info.temperature)  # fine-tune the head's own logits
        # backbone, classes and input size come from the head model, not from params
        size = head_info.image_size
        train, val = (open_split(layout.store("transfer"), split, size) for split in ("train", "val"))
        activations = None
        if params.finetune.cache_activations:
            activations = open_activations(layout.activations, head_info.backbone, size, load_backbone=False)
        run.log_split(layout.root, layout.split, {"train": len(train), "val": len(val)}, "training")
        result = training.train_finetune(model, train, val, params.finetune, params.train, params.augment,
                                         params.seed, activations, workdir, on_epoch=run.log_epoch)
        temperature = training.calibrate_result(result, params.train.calibrate)
        info = dataclasses.replace(head_info, stage="finetune", tta=params.train.tta, temperature=temperature)
        line = save_training_outputs(layout, result, info, run, val, params.mlflow.registered_model)
    return line


if __name__ == "__main__":
    run_stage(main)
