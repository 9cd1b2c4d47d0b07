"""One `dvc exp` worker's stages as far as MLflow sees them: two stage runs of one pipeline, in
the working directory's default store. Prints LOGGED <DVC_EXP_NAME>."""
import os

from conftest import tiny_params

from imgclf.params import params_from_dict
from imgclf.track.tracking import stage_run

params = params_from_dict(tiny_params())
for stage in ("download", "split"):
    with stage_run(stage, params, __import__("pathlib").Path.cwd()) as run:
        run.log_metrics({"images": 3.0})
print("LOGGED", os.environ["DVC_EXP_NAME"])
