"""The Keras models: the backbones with their preprocessing, the baseline CNN, the head and the
ensemble of fine-tuned tops (``models``), and a saved model with the metadata it travels with
(class names, input size, temperature: ``modelio``), and the backbones' ImageNet weights files in
Keras' cache, checked without TensorFlow (``weights``). Imports only the package's core modules."""
