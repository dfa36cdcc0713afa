"""The CPU that a local Ray instance's own processes (raylet, GCS, agents, log monitor, idle workers) burn while a
job's iterations run: the part of the orchestration's cost a driver's metrics cannot see (trainers/timing.py
counts the driver and the actors; on a cluster these processes live on other nodes).

``RayProcessCPU(metrics_path, first_row, last_row)`` watches the run's metrics file from a thread: it reads the CPU
times of this process's descendants when ``first_row`` rows are written and again at ``last_row``, before the run
shuts Ray down. Only twice: a reading walks /proc, which costs the driver's process (where the thread runs) a
millisecond or more. Role actors are told apart from Ray's processes by
their title (``ray::<Class>``, which Ray gives every actor's and task worker's process).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

# process titles of Ray's own helpers that also start with "ray::"
RAY_HELPERS = ("IDLE", "DashboardAgent", "RuntimeEnvAgent")


def is_ray_process(title: str) -> bool:
    """Whether a process (by its command line) is Ray's own rather than a role actor."""
    if not title.startswith("ray::"):
        return True
    return title.removeprefix("ray::").split(".", 1)[0].split(" ", 1)[0] in RAY_HELPERS


def process_cpu(proc: psutil.Process) -> float:
    """A process's CPU seconds so far, user and system."""
    t = proc.cpu_times()
    return t.user + t.system


def ray_process_cpu(root: int | None = None) -> dict[int, tuple[str, float, float]]:
    """``{pid: (name, CPU seconds so far, start time)}`` (user + system) of Ray's own processes among ``root``'s (this
    process's) descendants; the name is the executable's, or the ``ray::`` title."""
    out = {}
    for proc in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline()) or proc.name()
            if is_ray_process(title):
                out[proc.pid] = (process_name(title), process_cpu(proc), proc.create_time())
        except psutil.Error:  # gone between listing and reading, or a zombie
            continue
    return out


def process_name(title: str) -> str:
    """``raylet``, ``gcs_server``, ``log_monitor.py``, ``ray::DashboardAgent``: a process's name from its command."""
    if title.startswith("ray::"):
        return title.split(" ", 1)[0]
    words = title.split() or ["?"]
    exe = os.path.basename(words[0])
    if exe.startswith("python"):  # the script it runs (raylet's own arguments name python scripts too)
        exe = os.path.basename(next((w for w in words[1:] if w.endswith(".py")), exe))
    return exe


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has been busy since boot (all processes, ours or not)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Reading(NamedTuple):
    rows: int  # metrics rows written
    wall: float  # time.perf_counter()
    ray: dict  # ray_process_cpu()
    machine_busy: float  # machine_busy_s()
    time: float  # time.time(), to compare with processes' start times


class RayProcessCPU:
    def __init__(self, metrics_path: str | os.PathLike, first_row: int, last_row: int, poll_s: float = 0.02) -> None:
        self.path, self.first_row, self.last_row, self.poll_s = Path(metrics_path), first_row, last_row, poll_s
        self.start: Reading | None = None
        self.last: Reading | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="ray-cpu")

    def __enter__(self) -> RayProcessCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _rows(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    def _watch(self) -> None:
        size, rows, fresh = -1, 0, False  # fresh: seen with fewer rows (a rerun replaces an older file's)
        while not self._stop.wait(self.poll_s):
            try:
                now = self.path.stat().st_size
            except OSError:
                continue
            if now == size:
                continue
            size, rows = now, self._rows()
            fresh = fresh or rows < self.first_row
            if not fresh or rows < self.first_row or (self.start is not None and rows < self.last_row):
                continue
            reading = Reading(rows, time.perf_counter(), ray_process_cpu(), machine_busy_s(), time.time())
            if self.start is None:
                self.start = reading
            else:
                self.last = reading
                return

    def per_iteration(self) -> dict:
        """Ray's processes' CPU seconds per measured iteration (in all, and by process name: one that started
        after the first reading counts from its start), and the machine's busy CPU seconds per iteration (every
        process on it: our job's and anyone else's); empty if fewer than two rows were seen."""
        start, last = self.start, self.last
        if start is None or last is None or last.rows <= start.rows:
            return {}
        n = last.rows - start.rows
        by_name: dict[str, float] = {}
        started, missed = set(), set()
        for pid, (name, cpu, created) in last.ray.items():
            if pid in start.ray:
                cpu -= start.ray[pid][1]
            elif created >= start.time - 0.5:  # started in the window: all of its CPU is
                started.add(name)
            else:  # there before but not read then (a zombie, say): its CPU in the window is unknown
                missed.add(name)
                continue
            by_name[name] = by_name.get(name, 0.0) + cpu / n
        return {
            "ray_processes_cpu_s": sum(by_name.values()),
            "ray_processes_by_name_cpu_s": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
            "started_during": sorted(started),
            "not_read_at_the_start": sorted(missed),
            "machine_busy_cpu_s": (last.machine_busy - start.machine_busy) / n,
            "iterations_seen": float(n),
            "wall_s": (last.wall - start.wall) / n,
        }
