"""Running a trained model and reporting on it: the one inference path (LiteRT on a CPU, Keras as
the fallback: ``inference``), evaluation metrics and their reports and figures (``evaluation``,
``reporting``, ``figures``), Grad-CAM (``gradcam``), the exported formats (``export``) and the label
audit on the backbone's features (``audit``). Imports data and model, never training or tracking."""
