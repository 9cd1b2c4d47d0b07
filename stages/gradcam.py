"""DVC stage `gradcam`: heat maps of what the models look at, on right and wrong test images."""
import numpy as np

from imgclf import figures, tracking
from imgclf.datasets import load_subset
from imgclf.gradcam import gradcam, pick_examples
from imgclf.inference import predict_probs
from imgclf.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage


def draw(name: str, layout: Layout, count: int) -> None:
    model, info = load_model(layout.model(name))
    names = info.class_names
    test = load_subset(layout.split, "test", info.image_size, names)
    probs = predict_probs(model, test.images, info.tta)  # what evaluate measured and predict serves
    chosen = pick_examples(test.labels, probs, count)
    heatmaps, _ = gradcam(model, test.images[chosen].astype(np.float32))
    predicted = probs[chosen].argmax(axis=1)
    captions = [f"true {names[test.labels[i]]}\npred {names[p]} {probs[i, p]:.2f}"
                for i, p in zip(chosen, predicted)]
    colors = ["green" if test.labels[i] == p else "red" for i, p in zip(chosen, predicted)]
    figures.overlay_grid(test.images[chosen], heatmaps, captions, colors,
                         layout.plots("gradcam") / f"{name}.png",
                         title=f"Grad-CAM, {name} ({info.backbone}): green right, red wrong")


def main() -> None:
    layout = Layout(project_root())
    params = load_params(layout.params_file)
    names = ["finetune"] + (["baseline"] if params.gradcam.include_baseline else [])
    with tracking.stage_run("gradcam", params, layout.root) as run:
        for name in names:
            draw(name, layout, params.gradcam.num_images)
        run.log_artifacts(layout.plots("gradcam"), "gradcam")


if __name__ == "__main__":
    run_stage(main)
