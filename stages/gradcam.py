"""DVC stage `gradcam`: heat maps of what the models look at, on right and wrong test images."""
import numpy as np

from imgclf.data.store import open_split
from imgclf.model.modelio import load_model
from imgclf.params import load_params
from imgclf.project import Layout, project_root, run_stage
from imgclf.serve import figures
from imgclf.serve.gradcam import gradcam, pick_examples
from imgclf.serve.inference import predict_probs
from imgclf.track import tracking


def draw(name: str, layout: Layout, count: int) -> None:
    model, info = load_model(layout.model(name))
    names = info.class_names
    test = open_split(layout.model_store(name), "test", info.image_size)
    probs = predict_probs(model, test, info.tta)  # what evaluate measured and predict serves
    chosen = pick_examples(test.labels, probs, count)
    images = test.read(chosen)
    heatmaps, _ = gradcam(model, images.astype(np.float32))
    predicted = probs[chosen].argmax(axis=1)
    captions = [f"true {names[test.labels[i]]}\npred {names[p]} {probs[i, p]:.2f}"
                for i, p in zip(chosen, predicted)]
    colors = ["green" if test.labels[i] == p else "red" for i, p in zip(chosen, predicted)]
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
