"""imgclf: transfer-learning image classification, one DVC stage at a time.

Layers, lowest first; each imports only from its own and the ones before it (tests/test_structure.py):
the core modules here (errors, params, project, console, concurrency, cluster, network, progress),
then ``data``, ``model``, ``serve``, ``track`` and ``train``, and above them the commands
``python -m imgclf.predict``, ``imgclf.team`` and ``imgclf.review``."""
from .console import quiet_libraries

# Before TensorFlow or MLflow is imported: their start-up chatter hides the stage's own line
quiet_libraries()

__version__ = "0.1.0"
