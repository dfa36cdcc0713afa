"""One iteration as the driver runs it: the wall time of each phase and the role calls made in it, recorded where
the loop makes them. The timing table (``trainers/timing.py``) reads its chains from here, so it follows the loop
as written instead of a list of "role.method" names kept beside it.

Within a phase, calls on one role queue one after another on its actors (a chain); different roles run side by
side. Calls an actor makes on another role's actors (learner rank 0 driving the rollout engines in a weight push)
form a chain of their own, named for the call that makes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from rlhf_dist.orchestration.role_group import Pending, RoleGroup

Chains = dict[str, tuple[tuple[str, ...], ...]]


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}  # wall time per phase, in the order they ran
        self.on_driver: set[str] = set()  # phases computed by the driver itself: their wall time is compute
        self.driver_cpu: dict[str, float] = {}  # the driver's own CPU time in those (its main thread)
        self._calls: dict[str, dict[str, list[str]]] = {}  # phase -> chain -> ["role.method", ...]
        self._current: str | None = None

    @contextmanager
    def phase(self, name: str, on_driver: bool = False) -> Iterator[None]:
        self._current, t0, cpu0 = name, time.perf_counter(), time.thread_time()
        if on_driver:
            self.on_driver.add(name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if on_driver:
                self.driver_cpu[name] = self.driver_cpu.get(name, 0.0) + time.thread_time() - cpu0
            self._current = None

    def record(self, role: str, *methods: str, chain: str | None = None) -> None:
        """Calls made in the current phase (none outside a phase: those are not part of the iteration)."""
        if self._current is not None:
            calls = self._calls.setdefault(self._current, {}).setdefault(chain or role, [])
            calls.extend(f"{role}.{m}" for m in methods)

    def call(self, group: RoleGroup, method: str, *args: Any, **kwargs: Any) -> Pending:
        self.record(group.name, method)
        return group.call(method, *args, **kwargs)

    def scatter(self, group: RoleGroup, method: str, batch: pa.RecordBatch, *args: Any, **kwargs: Any) -> Pending:
        self.record(group.name, method)
        return group.scatter(method, batch, *args, **kwargs)

    def chains(self) -> Chains:
        return {phase: tuple(tuple(calls) for calls in chains.values()) for phase, chains in self._calls.items()}

    def driver_seconds(self) -> dict[str, float]:
        return {p: s for p, s in self.seconds.items() if p in self.on_driver}

    def total(self) -> float:
        return sum(self.seconds.values())
