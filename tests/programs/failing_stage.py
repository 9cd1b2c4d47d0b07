"""A stage whose main() raises one expected failure, named by argv[1], through run_stage (or,
with ``hang``, waits forever)."""
import sys
import threading

from imgclf.cluster import DistributedError
from imgclf.errors import DataError
from imgclf.params import ParamsError
from imgclf.project import run_stage
from imgclf.track.tracking import TrackingError

FAILURES = {
    "params": lambda: ParamsError("model.backbone", "bad"),
    "data": lambda: DataError("no images"),
    "tracking": lambda: TrackingError("server down"),
    "distributed": lambda: DistributedError("lost"),
}


def main() -> None:
    if sys.argv[1] == "hang":
        threading.Event().wait()
    raise FAILURES[sys.argv[1]]()


run_stage(main)
