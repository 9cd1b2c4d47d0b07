"""imgclf: transfer-learning image classification, one DVC stage at a time."""
import os

# TensorFlow's C++ start-up chatter hides the stage output that matters; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
