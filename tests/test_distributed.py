"""Training under tf.distribute.MirroredStrategy, on two logical CPU devices."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r'''
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import pathlib, tempfile
import numpy as np
from imgclf import training
from imgclf.datasets import ImageSet
from imgclf.params import params_from_dict
from conftest import COLORS, make_image, tiny_params

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
training.strategy = lambda: mirrored
params = params_from_dict(tiny_params())
training.configure(params.seed, params.train)
sections = (params.train, params.augment, params.seed)
images = np.stack([make_image(c * 100 + i, COLORS[c], 32) for c in range(3) for i in range(8)])
labels = np.repeat(np.arange(3, dtype=np.int32), 8)
data = ImageSet(images, labels, [""] * 24, ["a", "b", "c"])
base = training.train_baseline(data, data, params.baseline, *sections)
backbone, cut = training.backbone_cut(params.model, params.finetune)
head = training.train_head(data, data, backbone, params.model, params.head, *sections)
work = pathlib.Path(tempfile.mkdtemp())
acts = training.compute_activations(backbone, cut, params.model.backbone, data, data, work / "acts")
cached = training.train_head_on_activations(acts, params.model, params.head, params.train, params.seed, work)
with mirrored.scope():
    tuned = training.train_finetune(cached.model, data, data, params.finetune, *sections, acts, work)
assert mirrored.num_replicas_in_sync == 2
for result in (base, head, cached, tuned):
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"]).all()
print("MIRRORED-OK", mirrored.num_replicas_in_sync)
'''


def test_training_runs_under_mirrored_strategy_on_two_devices():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=600)
    assert "MIRRORED-OK 2" in result.stdout, result.stderr[-3000:]
