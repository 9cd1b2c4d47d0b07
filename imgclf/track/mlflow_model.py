"""The MLflow model served by `mlflow models serve`: image files in, class names and probabilities out.

Logged as an MLflow "model from code": MLflow copies this file into the model and runs it on load,
so it must not import the `imgclf` package (a serving machine need not have it). It imports the
decoder from `imgclf_images`, a copy of `imgclf/data/images.py` shipped in the model's code folder, so a
served photo is decoded exactly as in training (EXIF orientation, RGB, bilinear resize).

Request: a column ``image`` of base64-encoded image files (JPEG, PNG...), e.g.
``{"dataframe_records": [{"image": "<base64>"}]}``. Answer: per image, ``label`` (the most likely
class) and one probability column per class name.
"""
import base64
import json
import zipfile

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
KERAS_ARTIFACT = "keras_model"


class ImageClassifier(PythonModel):
    def load_context(self, context):
        import keras

        path = context.artifacts[KERAS_ARTIFACT]
        with zipfile.ZipFile(path) as archive:  # the pipeline's ModelInfo, stored beside the weights
            info = json.loads(archive.read("imgclf.json"))
        self.class_names = list(info["class_names"])
        self.image_size = int(info["image_size"])
        self.tta = bool(info.get("tta", False))
        self.model = keras.models.load_model(path, safe_mode=True, compile=False)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from imgclf_images import decode_rgb

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        images = np.stack([decode_rgb(_image_bytes(value), self.image_size)
                           for value in frame[IMAGE_COLUMN]]).astype(np.float32)
        probs = np.asarray(self.model(images, training=False))
        if self.tta:  # as imgclf.serve.inference.predict_probs: the mean with the mirror image
            probs = (probs + np.asarray(self.model(images[:, :, ::-1], training=False))) / 2
        answer = pd.DataFrame(probs.astype(np.float64), columns=self.class_names)
        answer.insert(0, LABEL_COLUMN, [self.class_names[i] for i in probs.argmax(axis=1)])
        return answer


def _image_bytes(value) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else base64.b64decode(value)


mlflow.models.set_model(ImageClassifier())
