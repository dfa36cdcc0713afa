"""When each iteration's experience is generated, relative to the training that uses it (``train.mode``).

A schedule hands the driver the generation to learn from at iteration ``i`` (a ``Pending`` of the rollout group: the
driver waits for it whole, or scores each part as it lands, ``train.stream_chunks``); the driver's ``start(i)``
samples the prompts, puts their generation in flight and says which policy version the engines must hold by then.
Weight pushes reach a rollout actor between two of its calls (an actor runs one call at a time), so a push never
lands in the middle of a generation. With each push the driver calls ``put_ahead(next iteration, push)``: what the
next iteration's ``generation`` would start is sent then, held by Ray until the push has landed (or, where the push
cannot be sent that early, right after it lands), so the engines generate while the driver logs.

- ``Sync``: generate, then learn; every sample comes from the weights the learners hold (staleness 0): a batch is
  started only once the push of the weights that learn from it has landed.
- ``OneStepOff``: iteration i+1's generation runs while iteration i is scored and trained (veRL's one-step-off,
  NeMo-RL's async with age 1): samples are at most one version behind the learners, and the push after training i
  queues behind that generation on each engine.
- ``Async``: the rollout actors work through a stream of prompt batches up to ``max_staleness`` iterations ahead of
  the learners (a bounded buffer: NeMo-RL's ``max_trajectory_age_steps``, AReaL's ``max_head_offpolicyness``); a
  batch started while the learners held version v is learnt from at v + ``max_staleness`` at the latest, so no sample
  older than the bound reaches a learner. A slow learner fills the buffer and generation waits (back-pressure);
  nothing is generated only to be thrown away.

The stale-weight alarm compares engine and learner log-probs at one version. Its first check is iteration 0, whose
batch comes from the weights both started with; later, every ``sync.check_every`` iterations, engines that score
given responses (``generation.scores_responses``) and the policy both score a sample right after the push, with
nothing drained. Otherwise (vLLM at a temperature other than 1) the pipelined schedules drain there (``fresh``):
that batch is generated after the push of the learners' current weights, one generation not overlapped per check.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from rlhf_dist.config import RunConfig
from rlhf_dist.orchestration.role_group import Pending

Start = Callable[..., Pending]  # (iteration, *what it waits for) -> its generation, in flight
Fresh = Callable[[int], bool]  # iteration -> whether its batch must come from the learners' current weights


class Pipelined:
    """Keeps the generations of up to ``max_staleness`` later iterations in flight while one iteration trains."""

    def __init__(self, start: Start, max_staleness: int, fresh: Fresh = lambda i: i == 0):
        self.start, self.max_staleness, self.fresh = start, max_staleness, fresh
        self.ahead: deque[tuple[int, Pending]] = deque()  # (iteration, its generation), in iteration order

    def put_ahead(self, iteration: int, last: int, *start_args: Any) -> None:
        """Puts iteration ``iteration``'s generation in flight unless it is (after a (re)start or resume, what was in
        flight belongs to other iterations: dropped), then the next ones up to ``max_staleness`` ahead, none past a
        fresh iteration. The driver calls it right after each push (the engines then hold the learners' version),
        or with the push in flight as ``start_args`` (what the generations started now wait for), so generation
        goes on while it logs the iteration: the engines never wait for the driver."""
        if iteration >= last:
            return
        if not self.ahead or self.ahead[0][0] != iteration:
            self.ahead.clear()
            self.ahead.append((iteration, self.start(iteration, *start_args)))
        nxt = self.ahead[-1][0] + 1
        while nxt < min(last, iteration + 1 + self.max_staleness) and not self.fresh(nxt):
            self.ahead.append((nxt, self.start(nxt, *start_args)))
            nxt += 1

    def drop(self, void: Callable[[Any], bool]) -> list[tuple[int, Any]]:
        """Takes the generations in flight that ``void`` says will never come (what ``start`` returned) out of the
        buffer; ``put_ahead`` starts them again. Returns them, ``(iteration, what start returned)``."""
        dropped = [(i, started) for i, started in self.ahead if void(started)]
        self.ahead = deque((i, started) for i, started in self.ahead if not void(started))
        return dropped

    def generation(self, iteration: int, last: int) -> Pending:
        """Iteration ``iteration``'s generation (put in flight earlier, or now), the next ones in flight behind it."""
        self.put_ahead(iteration, last)
        return self.ahead.popleft()[1]

    def in_flight(self) -> int | None:
        """The first iteration whose generation is in flight (its prompts are drawn)."""
        return self.ahead[0][0] if self.ahead else None

    def in_flight_until(self, iteration: int) -> list[tuple[int, object]]:
        """``(iteration, what start returned)`` for the iterations in flight up to ``iteration``."""
        return [(i, started) for i, started in self.ahead if i <= iteration]


class Sync(Pipelined):
    def __init__(self, start: Start):
        super().__init__(start, 0)


class OneStepOff(Pipelined):
    def __init__(self, start: Start, fresh: Fresh = lambda i: i == 0):
        super().__init__(start, 1, fresh)


class Async(Pipelined):
    pass


def make_schedule(cfg: RunConfig, start: Start) -> Sync | Pipelined:
    """``train.mode``'s schedule; the pipelined ones drain for the stale-weight alarm every ``sync.check_every``
    only where the engines cannot score a sample after the push."""
    mode = cfg.train.mode
    if mode == "sync":
        return Sync(start)
    fresh = cfg.sync.checks if not cfg.generation.scores_responses() else (lambda i: i == 0)
    return OneStepOff(start, fresh) if mode == "one_step_off" else Async(start, cfg.train.max_staleness, fresh)
