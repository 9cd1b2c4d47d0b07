"""Serving a model file the pipeline saved: its recorded LiteRT conversion where there is one, so a
pass over it (evaluate, `predict`) needs neither TensorFlow nor the Keras model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.datasets import Examples
from ..model.modelio import load_model
from . import inference
from .inference import Runner


def load_runner(path: Path, images: int, sample: np.ndarray | Examples) -> Runner:
    """The model saved at ``path``, ready for a pass of ``images`` inputs: on a CPU, its conversion
    recorded when it was saved or first served (:func:`imgclf.serve.inference.recorded_runner`: no
    TensorFlow import, no Keras model loaded); else the loaded Keras model's runner, checked on
    ``sample`` (the pass's first inputs), its conversion recorded for the next pass."""
    asked = os.environ.get(inference.RUNTIME_ENV, "auto") or "auto"
    if asked == "litert" or (asked == "auto" and not inference.gpu_possible()):
        served = inference.recorded_runner(path)
        if served is not None:
            return served
    model, _ = load_model(path)
    served = inference.runner_for(model, inference.as_examples(sample), images)
    served.parameters = int(model.count_params())
    if served.converted is not None:
        inference.record_conversion(path, model, served.converted, served.report["parity"])
    return served
