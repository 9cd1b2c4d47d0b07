"""Trains the baseline for one epoch from a store (argv[1]), streamed or held in memory
(argv[2]: stream | memory), in a fresh process, and prints its peak resident memory in MiB."""
import sys

import numpy as np
from conftest import tiny_params

from imgclf.data import store
from imgclf.data.datasets import ImageSet
from imgclf.params import params_from_dict
from imgclf.project import limit_malloc_arenas
from imgclf.train import training

folder, mode = sys.argv[1], sys.argv[2]
limit_malloc_arenas()  # as every stage does (run_stage)
params = params_from_dict(tiny_params(baseline={"epochs": 1, "image_size": 128, "filters": [4]}))
training.configure(params.seed, params.train)
train, val = store.open_split(folder, "train", 128), store.open_split(folder, "val", 128)
if mode == "memory":  # what a stage that loads its whole split does
    train = ImageSet(train.read(np.arange(len(train))), train.labels, train.paths, train.class_names)
training.calibrate_result(training.train_baseline(train, val, params.baseline, params.train, params.augment,
                                           params.seed), True)
# VmHWM of this process, not ru_maxrss: Linux carries the parent's high-water mark into
# ru_maxrss across exec, and the parent (pytest) may be larger than this whole test
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_MIB", peak_kib / 1024)
