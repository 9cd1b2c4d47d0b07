"""Runs left RUNNING by a process that died without ending them (SIGKILL, the OOM killer, a
preempted machine, a lost SSH session): every run a stage opens names its owner process and
carries a heartbeat; the next stage of the project closes, as KILLED, each RUNNING run whose
owner is certainly gone, and never one that may still be alive on another machine."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HOST_TAG = "imgclf.owner.host"
BOOT_TAG = "imgclf.owner.boot_id"
PID_TAG = "imgclf.owner.pid"
START_TAG = "imgclf.owner.start"  # the process's start time, in clock ticks after boot (pids are reused)
HEARTBEAT_TAG = "imgclf.heartbeat"  # unix seconds, refreshed every HEARTBEAT_S while the owner runs
FOUND_DEAD_TAG = "imgclf.found_dead"
HEARTBEAT_S = 30.0
# A run owned on another machine is judged by its heartbeat alone: closed only after this long
# without one, which a live stage (its heartbeat retried through a server restart) never reaches.
STALE_AFTER_S = 900.0


@dataclass(frozen=True)
class Owner:
    host: str
    boot_id: str
    pid: int
    start: str

    def tags(self) -> dict[str, str]:
        return {HOST_TAG: self.host, BOOT_TAG: self.boot_id, PID_TAG: str(self.pid), START_TAG: self.start}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Owner | None":
        try:
            return cls(tags[HOST_TAG], tags[BOOT_TAG], int(tags[PID_TAG]), tags[START_TAG])
        except (KeyError, ValueError):
            return None


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a Linux process (fields 4 and 22 of /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[19]


def process_start(pid: int) -> str | None:
    stat = proc_stat(pid)
    return None if stat is None else stat[1]


def this_process() -> Owner:
    import os

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return Owner(os.uname().nodename, boot_id, os.getpid(), process_start(os.getpid()) or "unknown")


def death_reason(tags: dict[str, str], now: float, me: Owner,
                 started: Callable[[int], str | None] = process_start) -> str | None:
    """Why the owner of a RUNNING run with these tags is certainly gone, or None if it may be alive.
    Runs that name no owner (made by hand or by other tools) are never judged."""
    owner = Owner.from_tags(tags)
    if owner is None:
        return None
    if owner.host == me.host and owner.boot_id == me.boot_id and me.boot_id != "unknown":
        if started(owner.pid) == owner.start:
            return None
        return f"process {owner.pid} on {owner.host} is gone"
    if owner.host == me.host and me.boot_id != "unknown" and owner.boot_id != "unknown":
        return f"{owner.host} restarted since process {owner.pid} opened the run"
    try:
        silent_for = now - float(tags.get(HEARTBEAT_TAG, ""))
    except ValueError:
        return None
    if silent_for > STALE_AFTER_S:
        return f"no heartbeat from process {owner.pid} on {owner.host} for {silent_for:.0f} s"
    return None


def close_dead_runs(client: Any, experiment_id: str, me: Owner) -> list[str]:
    """Close as KILLED every RUNNING run of the experiment whose owner is gone, tagging it with
    when and why it was found dead; returns their ids."""
    closed = []
    now = time.time()
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        reason = death_reason(run.data.tags, now, me)
        if reason is None:
            continue
        fresh = client.get_run(run.info.run_id)  # still RUNNING, still the same owner?
        if fresh.info.status != "RUNNING" or death_reason(fresh.data.tags, time.time(), me) is None:
            continue
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        client.set_tag(run.info.run_id, FOUND_DEAD_TAG, f"{stamp} by process {me.pid} on {me.host}: {reason}")
        last_sign = float(fresh.data.tags.get(HEARTBEAT_TAG) or now)
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(min(last_sign, now) * 1000))
        closed.append(run.info.run_id)
    return closed


class Heartbeat:
    """Refreshes the heartbeat tag of some runs every ``interval`` seconds from a daemon thread.
    A failed beat (a server restarting) is skipped; the next one tries again."""

    def __init__(self, client: Any, run_ids: list[str], interval: float = HEARTBEAT_S):
        self._client = client
        self._run_ids = run_ids
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="imgclf-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join(timeout=1.0)

    def _beat(self) -> None:
        while not self._stopped.wait(self._interval):
            for run_id in self._run_ids:
                try:
                    self._client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
                except Exception:  # noqa: BLE001 - a missed beat is harmless; the stage goes on
                    pass
