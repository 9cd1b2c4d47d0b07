"""The training rules, written once: keep the epoch with the lowest validation loss, stop early
when it has not improved for ``patience`` epochs, and cut the learning rate when it has
plateaued. Keras' fit applies them through :class:`imgclf.train.training.RulesCallback`; the multi-worker
loop in :mod:`imgclf.train.distributed` calls :class:`RuleKeeper` directly, so both decide alike. Pure
logic: no TensorFlow here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

PLATEAU_FACTOR = 0.3  # the learning rate is multiplied by this on a plateau
MIN_LEARNING_RATE = 1e-7  # ... but never below this
PLATEAU_MIN_DELTA = 1e-4  # a smaller fall of val_loss is still a plateau (Keras' default)

EpochHook = Callable[[int, dict[str, float]], None]  # (0-based epoch, that epoch's logs)


@dataclass(frozen=True)
class TrainingRules:
    epochs: int
    patience: int  # epochs without a lower val_loss before stopping; 0 = never stop early
    reduce_lr_patience: int  # epochs of plateau before cutting the learning rate; 0 = never


@dataclass(frozen=True)
class Decision:
    keep: bool  # this epoch's weights are the best so far: keep them
    stop: bool  # stop training after this epoch
    learning_rate: float | None  # the rate for the next epoch, when it changes


class RuleKeeper:
    """The rules' state over one training run; :meth:`end_epoch` is called once per epoch."""

    def __init__(self, rules: TrainingRules):
        self.rules = rules
        self.best_loss = math.inf
        self.wait = 0
        self.plateau_best = math.inf
        self.plateau_wait = 0

    def end_epoch(self, val_loss: float, learning_rate: float) -> Decision:
        keep = val_loss < self.best_loss  # only a strict improvement replaces the kept weights
        if keep:
            self.best_loss, self.wait = val_loss, 0
        else:
            self.wait += 1
        stop = bool(self.rules.patience) and self.wait >= self.rules.patience
        new_rate = None
        if self.rules.reduce_lr_patience:
            if val_loss < self.plateau_best - PLATEAU_MIN_DELTA:
                self.plateau_best, self.plateau_wait = val_loss, 0
            else:
                self.plateau_wait += 1
                if self.plateau_wait >= self.rules.reduce_lr_patience and learning_rate > MIN_LEARNING_RATE:
                    new_rate = max(learning_rate * PLATEAU_FACTOR, MIN_LEARNING_RATE)
                    self.plateau_wait = 0
        return Decision(keep, stop, new_rate)


def record(history: dict[str, list[float]], logs: dict[str, float]) -> None:
    """Append one epoch's logs to the history that is saved and logged."""
    for key, value in logs.items():
        history.setdefault(key, []).append(float(value))
