"""Packaging a trained model for MLflow: the model that `mlflow models serve` answers with
(:mod:`imgclf.track.mlflow_model`: image files in, class names and probabilities out), its signature,
input example and pinned requirements, and its version in the Model Registry."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator

from .. import console
from ..data import images
from ..model.modelio import read_metadata
from ..project import user_cache
from .tracking import StageRun


def log_served_model(run: StageRun, model_path: Path, name: str, example, register_as: str = "") -> str | None:
    """Log a saved .keras model as the MLflow model that `mlflow models serve` answers with
    (imgclf/track/mlflow_model.py: image files in, class names and probabilities out), the .keras
    file inside it, with a signature and an input example (the first of ``example``, images
    as the model takes them, as a PNG file; the signature is written out, not inferred, as
    inference would run the model here). With ``register_as``, also register it in the
    Model Registry and tag the version with the DVC experiment and git commit. Returns the
    registered version, if any."""
    if not run.active:
        return None
    return run.attempt(f"model {name}", lambda: _log_model(run, model_path, name, example, register_as))


def _log_model(run: StageRun, model_path: Path, name: str, example, register_as: str) -> str | None:
    import shutil
    import tempfile

    import mlflow
    from mlflow.types import ColSpec, Schema

    from . import mlflow_model  # imports MLflow: only when tracking is on

    class_names = read_metadata(model_path).class_names
    signature = mlflow.models.ModelSignature(
        inputs=Schema([ColSpec("string", mlflow_model.IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", mlflow_model.LABEL_COLUMN), ColSpec("string", mlflow_model.ERROR_COLUMN)]
                       + [ColSpec("double", name) for name in class_names]))
    photo = served_example(example)
    artifacts = {mlflow_model.KERAS_ARTIFACT: str(model_path)}
    litert = served_litert_file(model_path, example)
    if litert is not None:
        artifacts[mlflow_model.LITERT_ARTIFACT] = str(litert)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = Path(tmp) / "imgclf_images.py"  # the decoder, importable without imgclf
        shutil.copyfile(images.__file__, decoder)
        with _attached(run.client, run.run_id):
            info = _quietly(mlflow.pyfunc.log_model, name=name, python_model=mlflow_model.__file__,
                            code_paths=[str(decoder)], artifacts=artifacts,
                            signature=signature, input_example=photo, registered_model_name=register_as or None,
                            pip_requirements=serving_requirements())
    version = getattr(info, "registered_model_version", None)
    if register_as and version is not None:
        tags = run.client.get_run(run.run_id).data.tags
        for key in ("dvc_exp_name", "git_commit"):
            run.client.set_model_version_tag(register_as, str(version), key, tags.get(key, ""))
    return None if version is None else str(version)


def served_litert_file(model_path: Path, example) -> Path | None:
    """The saved model's LiteRT file for the served model to run: the pipeline's cached conversion
    (the one `evaluate` and `predict` run, converted now if missing), checked against Keras on
    ``example`` and recorded for them (:func:`imgclf.serve.inference.record_conversion`); None, with
    one warning line, where LiteRT cannot run it (it is served on Keras)."""
    import numpy as np

    from ..model.modelio import load_model
    from ..serve.inference import check_parity, fingerprint, litert_file, litert_interpreter, record_conversion

    model, _ = load_model(model_path)
    try:
        path, _ = litert_file(model, user_cache("litert") / f"{fingerprint(model)}.tflite")
        parity = check_parity(model, litert_interpreter(path, tuple(model.input.shape[1:])),
                              np.asarray(example, np.float32))
    except Exception as err:  # noqa: BLE001 - the converter's errors have no common type; parity failed
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        console.warn(f"the served MLflow model of {model_path.name} runs on Keras: LiteRT cannot run it ({reason})")
        return None
    record_conversion(model_path, model, path, parity)
    return path


def _quietly(function, *args, **kwargs):
    """``function`` with its stderr prints (MLflow's "Successfully registered model ...") kept for
    ``IMGCLF_VERBOSE``: the stage's own line says which version it registered."""
    if console.verbose():
        return function(*args, **kwargs)
    with contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


def served_example(batch) -> "Any":
    """The first image of ``batch`` (uint8-range RGB) as the served model's input: a one-row frame
    with the base64 text of a PNG file, stored with the model as its input example."""
    import base64
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from .mlflow_model import IMAGE_COLUMN

    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(batch[0]), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def serving_requirements() -> list[str]:
    """What the served model imports, pinned to the versions that trained it."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in
            ("mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow", "ai-edge-litert")]


@contextlib.contextmanager
def _attached(client: Any, run_id: str) -> Iterator[None]:
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        yield
    client.update_run(run_id, status="RUNNING")  # leaving start_run ended it; the stage has not ended
