"""When each iteration's experience is generated, relative to the training that uses it (``train.mode``).

A schedule hands the driver the batch to learn from at iteration ``i``; the driver's ``start(i)`` samples the prompts
and puts generation in flight (a ``Pending`` of the rollout group), and says which policy version the engines must
hold by then. Weight pushes reach a rollout actor between two of its calls (an actor runs one call at a time), so a
push never lands in the middle of a generation.

- ``Sync``: generate, then learn; every sample comes from the weights the learners hold (staleness 0).
- ``OneStepOff``: iteration i+1's generation runs while iteration i is scored and trained (veRL's one-step-off,
  NeMo-RL's async with age 1): samples are at most one version behind the learners, and the push after training i
  queues behind that generation on each engine.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from rlhf_dist.orchestration.role_group import Pending

Start = Callable[[int], Pending]  # iteration -> its generation, in flight


class Sync:
    max_staleness = 0

    def __init__(self, start: Start):
        self.start = start

    def batch(self, iteration: int, last: int) -> pa.RecordBatch:
        return self.start(iteration).batch()

    def in_flight(self) -> int | None:
        """The iteration whose generation is in flight between two iterations (its prompts are already drawn)."""
        return None


class OneStepOff:
    max_staleness = 1

    def __init__(self, start: Start):
        self.start = start
        self.next: tuple[int, Pending] | None = None

    def batch(self, iteration: int, last: int) -> pa.RecordBatch:
        """Iteration ``iteration``'s batch (generated during the previous iteration, or now after a (re)start), with
        the next iteration's generation put in flight first, so the engines never wait for the driver."""
        if self.next is None or self.next[0] != iteration:
            self.next = (iteration, self.start(iteration))
        pending = self.next[1]
        self.next = (iteration + 1, self.start(iteration + 1)) if iteration + 1 < last else None
        return pending.batch()

    def in_flight(self) -> int | None:
        return self.next[0] if self.next is not None else None


SCHEDULES = {"sync": Sync, "one_step_off": OneStepOff}
