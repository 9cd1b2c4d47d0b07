"""Grad-CAM finds the evidence: a class decided by one small patch."""
import numpy as np
from conftest import tiny_params

from imgclf.model import models
from imgclf.params import params_from_dict
from imgclf.serve.gradcam import gradcam, gradcam_batch_size, pick_examples
from imgclf.train import training

SIZE, PATCH = 32, 8


def patch_images(n: int, seed: int):
    """Grey noise; one 8x8 patch, red for class 0 and blue for class 1, somewhere."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 150, (n, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int32)
    corners = rng.integers(0, SIZE - PATCH, (n, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        image[y:y + PATCH, x:x + PATCH] = (230, 20, 20) if label == 0 else (20, 20, 230)
    return images, labels, corners


def test_heatmap_peaks_inside_the_deciding_patch():
    from imgclf.data.datasets import ImageSet, batches

    params = params_from_dict(tiny_params(baseline={"image_size": SIZE, "filters": [16, 32]}))
    training.configure(params.seed, params.train)
    images, labels, _ = patch_images(256, 0)
    model = models.build_baseline(params.baseline, 2)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(batches(ImageSet(images, labels, [], ["a", "b"]), 32, shuffle=True), epochs=6, verbose=0, shuffle=False)

    test, test_labels, corners = patch_images(24, 1)
    heatmaps, probs = gradcam(model, test.astype(np.float32), test_labels)
    assert heatmaps.shape == (24, SIZE, SIZE)
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert (probs.argmax(axis=1) == test_labels).mean() >= 0.9, "model did not learn the patch"
    inside = 0
    for heat, (y, x) in zip(heatmaps, corners):
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        inside += (y - 2 <= py < y + PATCH + 2) and (x - 2 <= px < x + PATCH + 2)
    assert inside / len(test) >= 0.8, f"heat map peaked in the patch for only {inside}/{len(test)}"


def test_gradcam_on_nested_backbones():
    for backbone in ("mobilenetv2", "efficientnetb0", "resnet50"):
        raw = tiny_params()
        raw["model"].update(backbone=backbone)
        model = models.build_transfer_model(params_from_dict(raw).model, 3)
        images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.float32)
        heatmaps, probs = gradcam(model, images)
        assert heatmaps.shape == (3, 32, 32) and np.isfinite(heatmaps).all()
        assert heatmaps.min() >= 0 and heatmaps.max() <= 1
        assert probs.shape == (3, 3)


def test_heatmaps_do_not_depend_on_the_batch_size():
    """Grad-CAM's batch (a few images on a CPU, to bound memory) changes no number."""
    model = models.build_transfer_model(params_from_dict(tiny_params()).model, 3)
    images = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3)).astype(np.float32)
    two_maps, two_probs = gradcam(model, images, batch_size=2)
    one_batch_maps, one_batch_probs = gradcam(model, images, batch_size=16)
    np.testing.assert_allclose(two_maps, one_batch_maps, atol=1e-5)
    np.testing.assert_allclose(two_probs, one_batch_probs, atol=1e-6)


def test_gradcam_batch_bounds_pixels_on_a_cpu():
    """Four 352 px images a step (the default model), more of smaller ones, never fewer than one."""
    assert gradcam_batch_size((352, 352)) == 4
    assert gradcam_batch_size((224, 224)) == 9
    assert gradcam_batch_size((2000, 2000)) == 1


def test_pick_examples_mixes_right_and_wrong():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])
    chosen = pick_examples(labels, probs.argmax(axis=1), probs.max(axis=1), 4)
    assert len(chosen) == 4
    assert set(chosen) >= {1, 3}  # both wrong ones
