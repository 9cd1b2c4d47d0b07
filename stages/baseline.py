"""DVC stage `baseline`: a CNN trained from scratch -> models/baseline.keras."""
from imgclf.data.store import open_split
from imgclf.model.modelio import ModelInfo
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.track import tracking
from imgclf.train import training
from imgclf.train.outputs import save_training_outputs


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    training.configure(params.seed, params.train)
    with tracking.stage_run("baseline", params, layout.root) as run:
        size = params.baseline.image_size
        train, val = (open_split(layout.store("baseline"), split, size) for split in ("train", "val"))
        run.log_split(layout.root, layout.split, {"train": len(train), "val": len(val)}, "training")
        result = training.train_baseline(train, val, params.baseline, params.train, params.augment, params.seed,
                                         on_epoch=run.log_epoch)
        temperature = training.calibrate_result(result, params.train.calibrate)
        info = ModelInfo("baseline", "baseline_cnn", train.class_names, size, params.train.tta, temperature)
        line = save_training_outputs(layout, result, info, run, val)
    return line


if __name__ == "__main__":
    run_stage(main)
