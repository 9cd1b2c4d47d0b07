"""DVC stage `gradcam`: heat maps of what the models look at, on right and wrong test images,
picked from the predictions `evaluate` wrote (the served model's, test-time augmentation included)."""
import numpy as np

from imgclf.data.store import open_split
from imgclf.model.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.serve import figures
from imgclf.serve.gradcam import gradcam, pick_examples
from imgclf.serve.reporting import read_predictions
from imgclf.track import tracking


def draw(name: str, layout: Layout, count: int) -> None:
    model, info = load_model(layout.model(name))
    names = info.class_names
    test = open_split(layout.model_store(name), "test", info.image_size)
    predicted, confidence = read_predictions(layout.plots("evaluate") / f"{name}_predictions.csv", test.paths, names)
    chosen = pick_examples(test.labels, predicted, confidence, count)
    images = test.read(chosen)
    heatmaps, _ = gradcam(model, images.astype(np.float32), predicted[chosen])
    captions = [f"true {names[test.labels[i]]}\npred {names[predicted[i]]} {confidence[i]:.2f}" for i in chosen]
    colors = ["green" if test.labels[i] == predicted[i] else "red" for i in chosen]
    figures.overlay_grid(images, heatmaps, captions, colors,
                         layout.plots("gradcam") / f"{name}.png",
                         title=f"Grad-CAM, {name} ({info.backbone}): green right, red wrong")


def main() -> str:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    names = ["finetune"] + (["baseline"] if params.gradcam.include_baseline else [])
    with tracking.stage_run("gradcam", params, layout.root) as run:
        for name in names:
            draw(name, layout, params.gradcam.num_images)
        run.log_artifacts(layout.plots("gradcam"), "gradcam")
    return (f"gradcam: heat maps of {params.gradcam.num_images} test images for {' and '.join(names)} in "
            f"{layout.plots('gradcam').relative_to(layout.root)}/")


if __name__ == "__main__":
    run_stage(main)
