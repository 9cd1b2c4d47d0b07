"""Export a trained model as a TensorFlow SavedModel and TFLite files, and check parity."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..model.modelio import ModelInfo
from .inference import Runner, litert_interpreter, predict_probs, serving_function


def export_saved_model(model, directory: Path, tta: bool) -> None:
    """A serving SavedModel taking float32 images 0..255, whose ``serve`` endpoint is the
    pipeline's serving function (test-time augmentation included when the model uses it).
    This is what ``model.export`` writes, with our endpoint instead of the bare model call."""
    import keras
    import tensorflow as tf

    shutil.rmtree(directory, ignore_errors=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, *model.input.shape[1:]), tf.float32, name="images")
    archive.add_endpoint("serve", serving_function(model, tta), input_signature=[spec])
    archive.write_out(str(directory), verbose=False)


def convert_tflite(saved_model: Path, files: dict[Path, str]) -> None:
    """Each of ``files`` (path -> quantization) converted from ``saved_model``: float32 ("none"),
    or float16 / dynamic-range int8 weights. One converter serves them all: the SavedModel is
    loaded once (the files are byte for byte what separate converters write)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    for path, quantization in files.items():
        converter.optimizations = [tf.lite.Optimize.DEFAULT] if quantization in ("float16", "int8") else []
        converter.target_spec.supported_types = [tf.float16] if quantization == "float16" else []
        path.write_bytes(converter.convert())


def saved_model_predictor(directory: Path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(directory))  # keep a reference: it owns the variables
    return lambda images: loaded.serve(tf.constant(images, dtype=tf.float32)).numpy()


def tflite_predictor(path: Path):
    """Run a TFLite file with LiteRT, the interpreter that replaces the deprecated
    ``tf.lite.Interpreter`` (and the one a deployed model runs on), one image at a time: the
    shape a deployed TFLite model sees."""
    interpreter = None

    def predict(images: np.ndarray) -> np.ndarray:
        nonlocal interpreter
        if interpreter is None:
            interpreter = litert_interpreter(path, images.shape[1:])
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        results = []
        for image in images:
            interpreter.set_tensor(inp["index"], image[None].astype(np.float32))
            interpreter.invoke()
            results.append(interpreter.get_tensor(out["index"])[0])
        return np.stack(results)

    return predict


def latency_ms(predict, images: np.ndarray, repeats: int = 3) -> float:
    """Median milliseconds per single image."""
    predict(images[:1])
    timings = []
    for image in images[:repeats * 4]:
        started = time.perf_counter()
        predict(image[None])
        timings.append(time.perf_counter() - started)
    return round(1000 * float(np.median(timings)), 3)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


def export_all(model, info: ModelInfo, out_dir: Path, quantization: str, check_images: np.ndarray) -> dict:
    """Write SavedModel, TFLite files and class names; return sizes, latency and parity with
    Keras, serving as the pipeline does (:func:`imgclf.serve.inference.predict_probs`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "saved_model"
    export_saved_model(model, saved, info.tta)
    formats = {"saved_model": saved, "tflite_float32": out_dir / "model_float32.tflite"}
    tflite = {formats["tflite_float32"]: "none"}
    if quantization != "none":
        formats[f"tflite_{quantization}"] = out_dir / f"model_{quantization}.tflite"
        tflite[formats[f"tflite_{quantization}"]] = quantization
    convert_tflite(saved, tflite)
    (out_dir / "class_names.json").write_text(json.dumps(
        {"class_names": info.class_names, "image_size": info.image_size, "tta": info.tta,
         "input": "float32 RGB 0..255, NHWC"}, indent=2))

    on_keras = Runner(model, "keras")  # one runner: no fingerprint or parity check per call

    def keras_predict(images):
        return predict_probs(on_keras, images, info.tta)

    reference = keras_predict(check_images)
    report = {"keras": {"latency_ms": latency_ms(keras_predict, check_images)}}
    for name, path in formats.items():
        predict = saved_model_predictor(path) if name == "saved_model" else tflite_predictor(path)
        got = predict(check_images)
        report[name] = {
            "size_mb": size_mb(path),
            "latency_ms": latency_ms(predict, check_images),
            "max_abs_diff_vs_keras": round(float(np.abs(got - reference).max()), 6),
            "top1_agreement": round(float((got.argmax(1) == reference.argmax(1)).mean()), 4),
        }
    return report
