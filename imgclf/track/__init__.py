"""MLflow: one parent run per pipeline execution with a child per stage (``tracking``), runs left
RUNNING by dead processes closed (``liveness``), and the served MLflow model with its packaging and
registry version (``mlflow_model``, ``model_packaging``). Imports data and model, never training."""
