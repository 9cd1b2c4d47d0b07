"""How a stage may use more than one core: threads, never a forked process.

A stage process holds threads from its first seconds on: TensorFlow's and LiteRT's thread pools,
OpenBLAS, MLflow's system-metrics sampler and the run's heartbeat. ``fork`` copies only the
calling thread, so a forked child can start with a lock that another thread held, and wait on it
forever (a cleanlab process pool did: the audit stage hung at 0% CPU). So:

- Decoding, resizing and file I/O use a ``ThreadPoolExecutor`` (Pillow and TensorFlow release the
  GIL there); TensorFlow and LiteRT use :func:`cpu_threads` threads of their own.
- Libraries that can start processes are called with one job (cleanlab's ``n_jobs=1``,
  scikit-learn's and joblib's ``n_jobs`` left at 1): on these data sizes their work is small.
- Should a stage ever need processes, it starts them with ``multiprocessing.get_context("spawn")``.
  :func:`forbid_fork`, which every stage runs first, turns any ``os.fork`` (a multiprocessing
  pool's default on Linux included) into an error naming this module, so a library that would
  fork fails at once instead of hanging at random. It does not make ``spawn`` the default: a
  library written for fork (cleanlab shares its data through globals) can hang under ``spawn``
  too. ``subprocess`` is unaffected: it execs the child at once.
"""
from __future__ import annotations

import os

FORK_REFUSED = ("a stage process must not fork: it runs threads, and a forked child can wait forever on a "
                "lock one of them held. Use threads, one job, or multiprocessing.get_context('spawn') "
                "(see imgclf/concurrency.py)")


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _refuse_fork(*_args, **_kwargs):
    raise RuntimeError(FORK_REFUSED)


def forbid_fork() -> None:
    """From now on this process starts no child by ``fork``: ``os.fork`` raises :data:`FORK_REFUSED`."""
    os.fork = _refuse_fork
