"""The one inference path: every pass that only infers (the frozen bottom in the activations
stage, feature passes, evaluate, Grad-CAM's predictions, `predict`, the audit, the export parity
check) goes through :func:`runner`, which decides the runtime that serves it, and
:func:`predict_probs` / :func:`run_outputs` on top of it. Export serves :func:`serving_function`,
so every consumer gets exactly what `evaluate` measured (test-time augmentation included).

On a CPU a pass runs on LiteRT with its XNNPACK delegate, 3-6 times Keras' speed for the same
network (MobileNetV2's frozen bottom at 224 px: 307 against 91 images/s on 2 cores, same run). The model is converted once
(:func:`litert_file`, cached by a fingerprint of its architecture and weights), and every pass
checks it against Keras on its first images before using it (:func:`check_parity`). Keras stays
the runtime on a GPU, for passes too small to repay a conversion, and where LiteRT cannot
convert a model (one warning line).

A saved model's conversion is also recorded under the model file's hash, with the parity check it
passed (:func:`record_conversion`): :func:`imgclf.serve.saved.load_runner` serves such a file on
LiteRT without importing TensorFlow or loading Keras (evaluate, `predict`), and loads Keras only for
a file whose conversion is not recorded. TensorFlow is imported by the functions that use it, not by
this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import console
from ..concurrency import cpu_threads
from ..data.datasets import Examples, ImageSet, batches, record_batches
from ..errors import StageError
from ..network import sha256_file
from ..project import user_cache

if TYPE_CHECKING:
    import keras

GPU_BATCH = 64
# On a CPU a batch's first, largest activations should stay in the processor's cache:
# MobileNetV2's frozen bottom at 224 px ran at 50-74 images/s 4 at a time against 29-37 at 64
# (2-core EPYC, 32 MiB L3), while the 96 px baseline is as fast at 16 as at 64.
CPU_BATCH_PIXELS = 4 * 224 * 224

RUNTIME_ENV = "IMGCLF_RUNTIME"  # auto (default) | litert | keras
# A conversion costs 1-10 s (MobileNetV2's two-top model at 352 px: 9 s on 2 cores on a slow day)
# and saves ~19 ms an image: smaller passes stay on Keras unless the model is already converted.
CONVERT_MIN_IMAGES = 256
PARITY_TOLERANCE = 1e-4  # max |LiteRT - Keras|, relative to the outputs' scale where it exceeds 1
PARITY_IMAGES = 16
CACHE_KEEP = 32  # converted models kept (least recently used removed first)


class ParityError(StageError):
    """A converted model disagrees with Keras: its outputs would be wrong."""


def inference_batch_size(record_shape: tuple[int, ...], on_cpu: bool = False) -> int:
    """Batch size of an inference-only pass over records of ``record_shape`` (images, cached
    activations or features), on a GPU if one is visible, or ``on_cpu``. No batch statistics at
    inference: it cannot change a prediction."""
    if len(record_shape) < 3 or (not on_cpu and gpu_visible()):
        return GPU_BATCH
    return max(1, min(GPU_BATCH, CPU_BATCH_PIXELS // (record_shape[0] * record_shape[1])))


def gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def serving_function(model: keras.Model, tta: bool):
    """``images (N, H, W, 3) float32 0..255 -> probabilities``; with ``tta`` the mean of the
    predictions for the images and their horizontal mirror images."""
    import tensorflow as tf

    if not tta:
        return lambda images: model(images, training=False)
    return lambda images: (model(images, training=False)
                           + model(tf.reverse(images, axis=[2]), training=False)) / 2


def gpu_possible() -> bool:
    """Whether TensorFlow may see a GPU, judged without importing it: a GPU device node (NVIDIA's,
    or ROCm's), unless ``CUDA_VISIBLE_DEVICES`` hides every device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


@dataclass
class Runner:
    """A model ready to infer: ``runner(batch) -> outputs`` (float32 numpy), on ``runtime``;
    ``report`` says which runtime served it, why, and its parity with Keras. ``model`` is None
    for a recorded conversion served without Keras (:func:`imgclf.serve.saved.load_runner`)."""

    model: keras.Model | None
    runtime: str
    report: dict = field(default_factory=dict)
    interpreter: object = None
    parameters: int | None = None
    converted: Path | None = None  # the cached LiteRT file it runs

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.ascontiguousarray(inputs, np.float32)
        if self.interpreter is None:
            return np.asarray(self.model.predict_on_batch(inputs), np.float32)
        return _litert_outputs(self.interpreter, inputs)

    @property
    def outputs(self) -> int:
        """The size of one output (the number of classes of a classifier)."""
        if self.interpreter is not None:
            return int(self.interpreter.get_output_details()[0]["shape"][-1])
        return int(self.model.output.shape[-1])

    def batch_size(self, record_shape: tuple[int, ...]) -> int:
        return inference_batch_size(record_shape, on_cpu=self.interpreter is not None)


def _litert_outputs(interpreter, inputs: np.ndarray) -> np.ndarray:
    """One image at a time: XNNPACK's fastest batch on a CPU (259 images/s at 1, 240 at 4, 225 at 8)."""
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    results = []
    for image in inputs:
        interpreter.set_tensor(inp, image[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out)[0].copy())
    return np.stack(results) if results else np.empty((0, *interpreter.get_output_details()[0]["shape"][1:]), np.float32)


def choose_runtime(images: int, converted: bool) -> tuple[str, str]:
    """("litert" | "keras", why) for a pass of ``images`` inputs; ``converted``: the model is
    already in the cache. ``IMGCLF_RUNTIME`` (auto | litert | keras) overrides."""
    asked = os.environ.get(RUNTIME_ENV, "auto") or "auto"
    if asked not in ("auto", "litert", "keras"):
        raise StageError(f"{RUNTIME_ENV}={asked!r}: expected auto, litert or keras")
    if asked != "auto":
        return asked, f"{RUNTIME_ENV}={asked}"
    if gpu_visible():
        return "keras", "a GPU is visible"
    if images < CONVERT_MIN_IMAGES and not converted:
        return "keras", f"{images} images: fewer than {CONVERT_MIN_IMAGES} do not repay a conversion"
    return "litert", "CPU"


def _layer_names(model: keras.Model) -> list[str]:
    import keras

    names = [model.name]
    for layer in model.layers:
        names += _layer_names(layer) if isinstance(layer, keras.Model) else [layer.name]
    return names


def fingerprint(model: keras.Model) -> str:
    """Names the function a model computes: its architecture (layer names replaced by their
    order, as Keras numbers unnamed layers per process), weights, and the converter's version."""
    import keras
    import tensorflow as tf

    architecture = model.to_json()
    for index, name in enumerate(dict.fromkeys(_layer_names(model))):
        architecture = architecture.replace(f'"{name}"', f'"#{index}"')
    digest = hashlib.sha256(architecture.encode())
    digest.update(tf.__version__.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:32]


def convert(model: keras.Model) -> bytes:
    """A float32 TFLite flatbuffer of ``model`` (inference mode), converted from its traced inference
    function with the weights frozen in. The same network as through the SavedModel that
    ``model.export`` writes, without writing and reloading one: MobileNetV2's frozen bottom at 352 px
    converted in 4.2-5.5 s against 9.7-12.5 s that way (2 cores, same run, same outputs); export
    still converts its SavedModel, the deliverable."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input.shape[1:]), tf.float32, name="inputs")
    holder = tf.Module()  # what the converter reads the weights from: the Keras variables' tf.Variables
    holder.keras_variables = [variable.value for variable in model.variables]
    holder.serve = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return tf.lite.TFLiteConverter.from_concrete_functions([holder.serve.get_concrete_function()], holder).convert()


def litert_file(model: keras.Model, path: Path) -> tuple[Path, float]:
    """The cached TFLite file ``path`` of ``model`` (converted now if missing) and the seconds converting took."""
    folder = path.parent
    if path.exists():
        os.utime(path)  # recently used
        return path, 0.0
    started = time.perf_counter()
    data = convert(model)
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)  # whole or absent, also with two stages converting at once
    for old in sorted(folder.glob("*.tflite"), key=lambda p: p.stat().st_mtime)[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)
    return path, seconds


def litert_interpreter(path: Path, input_shape: tuple[int, ...]):
    from ai_edge_litert.interpreter import Interpreter

    with console.native_log_filtered():  # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate"
        interpreter = Interpreter(model_path=str(path), num_threads=cpu_threads())
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], (1, *input_shape))
        interpreter.allocate_tensors()
    return interpreter


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The models whose probabilities ``model`` averages (an ensemble of fine-tuned tops, or an image
    model ending in one: :func:`imgclf.model.models.build_ensemble`), or ``[model]``."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Average):
        return [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if isinstance(last, keras.Model) and isinstance(last.layers[-1], keras.layers.Average):
        return ensemble_members(last)
    return [model]


def is_classifier(model: keras.Model) -> bool:
    """Ends in a softmax (or averages models that do): its outputs are class probabilities."""
    import keras

    members = ensemble_members(model)
    if members[0] is not model:
        return all(is_classifier(member) for member in members)
    return getattr(model.layers[-1], "activation", None) is keras.activations.softmax


def check_parity(model: keras.Model, interpreter, sample: np.ndarray) -> dict:
    """LiteRT against Keras on ``sample``: max |difference| within PARITY_TOLERANCE (times the
    outputs' largest magnitude where that exceeds 1: activations are not probabilities) and, for
    a classifier, the same top-1 class for every image. A ParityError names both numbers."""
    expected = np.asarray(model.predict_on_batch(sample), np.float32)
    got = _litert_outputs(interpreter, sample)
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    allowed = PARITY_TOLERANCE * max(1.0, scale)
    parity = {"images": len(sample), "max_abs_diff": float(f"{diff:.3g}"), "allowed": float(f"{allowed:.3g}"),
              "max_abs_output": float(f"{scale:.3g}"), "max_relative_diff": float(f"{diff / max(scale, 1e-12):.3g}")}
    if is_classifier(model):
        parity["top1_agreement"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
    if diff > allowed or parity.get("top1_agreement", 1.0) < 1.0:
        top1 = f", top-1 agreement {parity['top1_agreement']:.3f} (needs 1)" if "top1_agreement" in parity else ""
        raise ParityError(f"LiteRT's conversion of {model.name} disagrees with Keras on {len(sample)} images: "
                          f"max |difference| {diff:.3g} > {allowed:.3g}{top1}; set {RUNTIME_ENV}=keras to "
                          "run on Keras")
    return parity


def runner(model: keras.Model, images: int, sample: np.ndarray) -> Runner:
    """The runner of a pass of ``images`` inputs through ``model``: LiteRT on a CPU (converted
    once, checked against Keras on ``sample``, the pass's first inputs), else Keras. A model
    LiteRT cannot convert runs on Keras with one warning line; a parity failure stops the stage."""
    cached = user_cache("litert") / f"{fingerprint(model)}.tflite"
    runtime, why = choose_runtime(images, cached.exists())
    if runtime == "keras":
        return Runner(model, "keras", {"runtime": "keras", "why": why})
    try:
        path, seconds = litert_file(model, cached)
        interpreter = litert_interpreter(path, tuple(model.input.shape[1:]))
    except Exception as err:  # noqa: BLE001 - the converter's errors have no common type
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        print(f"warning: LiteRT cannot run {model.name} ({reason}); it runs on Keras", file=sys.stderr)
        return Runner(model, "keras", {"runtime": "keras", "why": f"LiteRT conversion failed: {reason}"})
    parity = check_parity(model, interpreter, np.asarray(sample[:PARITY_IMAGES], np.float32))
    return Runner(model, "litert", {"runtime": "litert", "why": why, "convert_seconds": round(seconds, 2),
                                    "threads": cpu_threads(), "parity": parity}, interpreter, converted=path)


def runner_for(model: keras.Model, examples: Examples, images: int | None = None) -> Runner:
    """:func:`runner` for a pass of ``images`` inputs (default: every one of ``examples``),
    checked on the first records of ``examples``."""
    sample = examples.read(np.arange(min(PARITY_IMAGES, len(examples)))).astype(np.float32)
    return runner(model, len(examples) if images is None else images, sample)


def _record_path(model_file: Path) -> Path:
    return user_cache("litert") / "saved" / f"{sha256_file(Path(model_file))[:32]}.json"


def record_conversion(model_file: Path, model: keras.Model, converted: Path, parity: dict) -> None:
    """Note that the model saved at ``model_file`` (as its bytes are now; ``model``, loaded from it)
    is served by the cached LiteRT file ``converted``, which passed ``parity`` against Keras, so that
    :func:`imgclf.serve.saved.load_runner` can serve that file without Keras."""
    record = {"file": converted.name, "parity": parity, "parameters": int(model.count_params()),
              "input_shape": list(model.input.shape[1:])}
    path = _record_path(model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)


def recorded_runner(model_file: Path) -> Runner | None:
    """The LiteRT runner of a saved model whose conversion :func:`record_conversion` noted and whose
    converted file is still cached, or None."""
    try:
        record = json.loads(_record_path(model_file).read_text())
        path = user_cache("litert") / record["file"]
        if not path.exists():
            return None
        interpreter = litert_interpreter(path, tuple(record["input_shape"]))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):  # no record, or a damaged one
        return None
    os.utime(path)  # recently used
    report = {"runtime": "litert", "why": "CPU", "convert_seconds": 0.0, "threads": cpu_threads(),
              "parity": record["parity"], "parity_checked": "when converted"}
    return Runner(None, "litert", report, interpreter, parameters=int(record["parameters"]), converted=path)


def as_examples(images: np.ndarray | Examples) -> Examples:
    if isinstance(images, np.ndarray):
        return ImageSet(images, np.zeros(len(images), np.int32), [], ["_"])
    return images


def run_outputs(model: keras.Model | Runner, examples: Examples, augment=None,
                batch_size: int | None = None):
    """Yield the outputs of ``model`` (a Keras model or its runner) for successive batches of
    ``examples`` (augmented by ``augment`` if given), in order."""
    run = model if isinstance(model, Runner) else runner_for(model, examples)
    batch_size = batch_size or run.batch_size(examples.record_shape)
    if augment is None:
        yield from map(run, record_batches(examples, batch_size))
        return
    for x in batches(examples, batch_size, augment=augment, labels=False):  # TF's random augmentation
        yield run(x.numpy())


def predict_probs(model: keras.Model | Runner, images: np.ndarray | Examples, tta: bool,
                  batch_size: int | None = None) -> np.ndarray:
    """Class probabilities for images in 0..255: an array (uint8 or float) or a set of examples
    (a split of the store), streamed in batches and cast to float32 per batch; with ``tta`` the
    mean with the mirror images' probabilities. ``model``: a Keras model or a :class:`Runner`."""
    images = as_examples(images)
    if len(images) == 0:
        outputs = model.outputs if isinstance(model, Runner) else model.output.shape[-1]
        return np.empty((0, outputs), np.float32)
    run = model if isinstance(model, Runner) else runner_for(model, images, len(images) * (2 if tta else 1))
    out = []
    for x in record_batches(images, batch_size or run.batch_size(images.record_shape)):
        probs = run(x)
        if tta:
            probs = (probs + run(x[:, :, ::-1])) / 2
        out.append(probs)
    return np.concatenate(out)
