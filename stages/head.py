"""DVC stage `head`: frozen backbone, train the classification head -> models/head.keras.

By default the head trains on features pooled from the cached activations (no pass over the
images); with `head.augment` or `cache_features: false` the frozen backbone runs every step."""
from imgclf.data.store import open_split
from imgclf.model.modelio import ModelInfo
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.track import tracking
from imgclf.train import training
from imgclf.train.activations import open_activations
from imgclf.train.outputs import save_training_outputs


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params.seed, params.train)
    with tracking.stage_run("head", params, layout.root) as run:
        size = params.model.image_size
        activations = open_activations(layout.activations, params.model.backbone, size)
        train, val = (open_split(layout.store("transfer"), split, size) for split in ("train", "val"))
        run.log_split(layout.root, layout.split, {"train": len(train), "val": len(val)}, "training")
        if params.head.cache_features and not params.head.augment:
            result = training.train_head_on_activations(activations, params.model, params.head, params.train,
                                                        params.seed, on_epoch=run.log_epoch)
        else:
            result = training.train_head(train, val, activations.backbone, params.model, params.head, params.train,
                                         params.augment, params.seed, on_epoch=run.log_epoch)
        temperature = training.calibrate_result(result, params.train.calibrate)
        info = ModelInfo("head", params.model.backbone, train.class_names, size, params.train.tta, temperature)
        line = save_training_outputs(layout, result, info, run, val)
    return line


if __name__ == "__main__":
    run_stage(main)
