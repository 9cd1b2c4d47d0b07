"""Trains every phase for one epoch under MirroredStrategy on two logical CPU devices; prints
MIRRORED-OK 2. Run by tests/test_distributed.py in its own process (the devices must be set
before TensorFlow starts)."""
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import pathlib
import tempfile

import numpy as np
from conftest import COLORS, make_image, tiny_params

from imgclf.data.datasets import ImageSet
from imgclf.params import params_from_dict
from imgclf.train import distributed, training
from imgclf.train.activations import backbone_cut, compute_activations

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
distributed.strategy = lambda: mirrored
params = params_from_dict(tiny_params())
training.configure(params.seed, params.train)
sections = (params.train, params.augment, params.seed)
images = np.stack([make_image(c * 100 + i, COLORS[c], 32) for c in range(3) for i in range(8)])
labels = np.repeat(np.arange(3, dtype=np.int32), 8)
data = ImageSet(images, labels, [""] * 24, ["a", "b", "c"])
base = training.train_baseline(data, data, params.baseline, *sections)
backbone, cut = backbone_cut(params.model, params.finetune)
head = training.train_head(data, data, backbone, params.model, params.head, *sections)
work = pathlib.Path(tempfile.mkdtemp())
acts = compute_activations(backbone, cut, params.model.backbone, data, data, work / "acts")
cached = training.train_head_on_activations(acts, params.model, params.head, params.train, params.seed)
with mirrored.scope():
    tuned = training.train_finetune(cached.model, data, data, params.finetune, *sections, acts, work)
assert mirrored.num_replicas_in_sync == 2
for result in (base, head, cached, tuned):
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"]).all()
print("MIRRORED-OK", mirrored.num_replicas_in_sync)
