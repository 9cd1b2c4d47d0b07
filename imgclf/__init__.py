"""imgclf: transfer-learning image classification, one DVC stage at a time."""
from .console import quiet_libraries

# Before TensorFlow or MLflow is imported: their start-up chatter hides the stage's own line
quiet_libraries()

__version__ = "0.1.0"
