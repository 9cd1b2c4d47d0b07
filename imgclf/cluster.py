"""Which machine of a cluster this process is: the parsed ``TF_CONFIG``, the chief that writes
outputs and MLflow runs, and the stages that refuse to run on several machines. Read by training
and by tracking alike, so it sits below both (training itself: :mod:`imgclf.train.distributed`)."""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import StageError


class DistributedError(StageError, RuntimeError):
    """TF_CONFIG is malformed, or a worker of the cluster was lost."""


def cluster() -> dict[str, Any] | None:
    """The parsed ``TF_CONFIG`` (None when unset); a DistributedError naming what is wrong."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        workers = config["cluster"].get("worker", [])
        chiefs = config["cluster"].get("chief", [])
        kind, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DistributedError(f"TF_CONFIG: expected {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, "
                               f"\"task\": {{\"type\": \"worker\", \"index\": 0}}}} ({type(err).__name__}: {err})")
    members = {"worker": workers, "chief": chiefs}
    if kind not in members or not 0 <= index < len(members[kind]):
        raise DistributedError(f"TF_CONFIG: task {kind}:{index} is not in the cluster {config['cluster']}")
    return config


def is_chief() -> bool:
    """True on a single machine, and on the one task of a cluster that writes outputs."""
    config = cluster()
    if config is None:
        return True
    kind, index = config["task"]["type"], int(config["task"]["index"])
    return kind == "chief" or (kind == "worker" and index == 0 and not config["cluster"].get("chief"))


def task_name() -> str:
    config = cluster()
    return "local" if config is None else f"{config['task']['type']}:{config['task']['index']}"


def require_single_machine(stage: str) -> None:
    """Stages that do not train run on one machine: a DistributedError under TF_CONFIG."""
    if cluster() is not None:
        raise DistributedError(f"TF_CONFIG is set, but the {stage} stage runs on one machine: only baseline, "
                               "head and finetune train across machines; run it without TF_CONFIG")
