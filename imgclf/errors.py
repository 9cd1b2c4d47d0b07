"""Expected failures: bad params, unusable data, an unreachable server, a lost worker. A stage
ends on one with its message as one line and exit status 1 (:func:`imgclf.project.run_stage`);
anything else is a bug and keeps its traceback. The lowest module of the package: it imports
nothing, so every module can raise these."""


class StageError(Exception):
    """An expected failure whose message says what is wrong and what to do."""


class DataError(StageError, ValueError):
    """Input data cannot be used (empty class, no images, bad archive...)."""
