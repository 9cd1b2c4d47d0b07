"""The audit's label-issue step run the way the stage runs it: TensorFlow imported, a background
thread alive (as MLflow's sampler and the heartbeat are), on a machine that cleanlab counts as
having 4 physical cores. Prints, as JSON, how many times this process forked and how many child
processes it had when the step ended. With ``guarded``, the stage's fork guard is on first."""
import json
import os
import sys
import threading

import psutil
import tensorflow  # noqa: F401 - the stage process has TensorFlow's threads
from test_audit import CLASSES, PARAMS, clustered_sets

from imgclf.serve.audit import audit

psutil.cpu_count = lambda logical=True: 4  # cleanlab sizes its process pool by physical cores
forks = []
os.register_at_fork(before=lambda: forks.append(1))
children = []
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
if "guarded" in sys.argv:
    from imgclf.concurrency import forbid_fork

    forbid_fork()


def watch():
    while not stop.is_set():
        children.extend(c.pid for c in psutil.Process().children(recursive=True))
        stop.wait(0.01)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
sets = clustered_sets({"train": 200, "val": 50, "test": 50}, {"train": [0, 5, 9]})
report = audit(sets, CLASSES, PARAMS, seed=0)
stop.set()
watcher.join()
print(json.dumps({"forks": len(forks), "children": sorted(set(children)), "rows": len(report.label_issues)}))
