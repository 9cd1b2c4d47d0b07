"""Training: the frozen backbone's cached activations (``activations``), augmentation and mixup
(``augment``), the training loops and their rules (``training``, ``rules``), training across machines
(``distributed``), temperature calibration (``calibration``) and a trained stage's outputs
(``outputs``). The top layer: it may import every other one."""
