"""The MLflow model served by `mlflow models serve`: image files in, class names and probabilities out.

It runs on LiteRT (the pipeline's own conversion of the model, checked against Keras when it was
logged, as `predict` and every pass that only infers do on a CPU), and on Keras where the model has no
LiteRT file, LiteRT is not installed, or ``IMGCLF_RUNTIME=keras`` is set.

Logged as an MLflow "model from code": MLflow copies this file into the model and runs it on load,
so it must not import the `imgclf` package (a serving machine need not have it). It imports the
decoder from `imgclf_images`, a copy of `imgclf/data/images.py` shipped in the model's code folder, so a
served photo is decoded exactly as in training (EXIF orientation, RGB, bilinear resize).

Request: a column ``image`` of base64-encoded image files (JPEG, PNG...), e.g.
``{"dataframe_records": [{"image": "<base64>"}]}``. Answer: per image, ``label`` (the most likely
class), ``error`` (empty, or what is wrong with that row's image: not base64, not an image, corrupt or
truncated, too large; its label is then empty and its probabilities NaN) and one probability column
per class name. A bad row never fails the others.
"""
import base64
import binascii
import json
import os
import threading
import zipfile

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
ERROR_COLUMN = "error"
MAX_IMAGE_BYTES = 32 * 2**20  # one request's image file, before decoding
KERAS_ARTIFACT = "keras_model"
LITERT_ARTIFACT = "litert_model"


class ImageClassifier(PythonModel):
    def load_context(self, context):
        path = context.artifacts[KERAS_ARTIFACT]
        with zipfile.ZipFile(path) as archive:  # the pipeline's ModelInfo, stored beside the weights
            info = json.loads(archive.read("imgclf.json"))
        self.class_names = list(info["class_names"])
        self.image_size = int(info["image_size"])
        self.tta = bool(info.get("tta", False))
        self.model = self.interpreter = None
        self.runtime_lock = threading.Lock()  # one interpreter: requests answered in threads take turns
        litert = context.artifacts.get(LITERT_ARTIFACT)
        if litert and os.environ.get("IMGCLF_RUNTIME", "auto") != "keras":
            try:
                from ai_edge_litert.interpreter import Interpreter

                interpreter = Interpreter(model_path=litert, num_threads=os.cpu_count() or 1)
                interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"],
                                                (1, self.image_size, self.image_size, 3))
                interpreter.allocate_tensors()
                self.interpreter = interpreter
            except (ImportError, ValueError, RuntimeError):
                self.interpreter = None
        if self.interpreter is None:
            import keras

            self.model = keras.models.load_model(path, safe_mode=True, compile=False)

    def _probs(self, images: np.ndarray) -> np.ndarray:
        if self.interpreter is None:
            return np.asarray(self.model(images, training=False))
        inp = self.interpreter.get_input_details()[0]["index"]
        out = self.interpreter.get_output_details()[0]["index"]
        found = []
        with self.runtime_lock:
            for image in images:  # one at a time: XNNPACK's fastest batch on a CPU, as in the pipeline
                self.interpreter.set_tensor(inp, image[None])
                self.interpreter.invoke()
                found.append(self.interpreter.get_tensor(out)[0].copy())
        return np.stack(found)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        decoded = [_decode(value, self.image_size) for value in frame[IMAGE_COLUMN]]
        good = [i for i, (image, _) in enumerate(decoded) if image is not None]
        probs = np.full((len(decoded), len(self.class_names)), np.nan)
        if good:
            images = np.stack([decoded[i][0] for i in good]).astype(np.float32)
            found = self._probs(images)
            if self.tta:  # as imgclf.serve.inference.predict_probs: the mean with the mirror image
                found = (found + self._probs(np.ascontiguousarray(images[:, :, ::-1]))) / 2
            probs[good] = found
        answer = pd.DataFrame(probs, columns=self.class_names)
        answer.insert(0, LABEL_COLUMN, ["" if error else self.class_names[int(np.argmax(row))]
                                        for row, (_, error) in zip(probs, decoded)])
        answer.insert(1, ERROR_COLUMN, [error for _, error in decoded])
        return answer


def _decode(value, size: int) -> tuple[np.ndarray | None, str]:
    """One request row's image, decoded as in training, or None and what is wrong with it."""
    from imgclf_images import BadImageError, decode_checked

    try:
        data = bytes(value) if isinstance(value, (bytes, bytearray)) else base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None, "not a base64-encoded image file"
    if len(data) > MAX_IMAGE_BYTES:
        return None, f"image too large: {len(data) / 2**20:.1f} MiB (at most {MAX_IMAGE_BYTES // 2**20} MiB)"
    try:
        return decode_checked(data, size), ""
    except BadImageError as reason:
        return None, str(reason)


mlflow.models.set_model(ImageClassifier())
