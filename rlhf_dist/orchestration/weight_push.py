"""The driver's side of weight sync: once per iteration, the learners push their weights into the rollout engines
and the push ends with a version check.

Learner rank 0 drives the engines itself through vLLM's weight-transfer control plane (init, start, update,
finish; rlhf_dist.engines.weight_sync): the bytes never pass through the driver, and every transport (object
store, NCCL, CUDA IPC, sparse NCCL) is the same two calls from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from rlhf_dist.config import RunConfig
from rlhf_dist.orchestration.phases import Phases
from rlhf_dist.orchestration.role_group import Pending, RoleGroup, RoleGroupError

# what learner rank 0 calls on every rollout actor during a push (engines/weight_sync/client.py)
ROLLOUT_UPDATE = ("start_weight_update", "update_weights", "finish_weight_update")


class WeightPush:
    """Also the rollout group's healer: a rollout engine that Ray restarted (``RoleGroup.on_restart``) is reconnected
    with the others and given the last weights pushed, before the call it died in is sent again."""

    def __init__(self, cfg: RunConfig, policy: RoleGroup, rollout: RoleGroup):
        self.policy, self.rollout = policy, rollout
        # a hybrid actor (generation.hybrid_engine) loads the weights into its own engine in memory
        self.name = "in_process" if rollout.view_of == policy.name else cfg.weight_transport()
        self.args = (
            rollout.actors,
            self.name,
            cfg.generation.tensor_parallel_size if cfg.generation.engine == "vllm" else 1,  # workers per engine
            cfg.sync.bucket_mb,
            cfg.ray.actor_timeout_s,
        )
        self.version = 0  # what the engines hold: version 0 is the model they load from disk
        self.restoring = False  # inside a failed push: the retry brings the weights, reconnecting is enough
        self.connect()
        rollout.on_restart = self.restore

    def connect(self) -> None:
        """Every rollout engine joins learner rank 0's weight transfer (again, after one restarted: a new engine
        knows nothing of the old transfer group)."""
        self.policy.call("init_weight_sync", *self.args).get()

    def restore(self, rank: int) -> None:
        self.connect()
        if self.version and not self.restoring:  # the learner still holds self.version: no push is under way
            self._push(self.version, Phases())

    def push(self, version: int, phases: Phases | None = None) -> dict[str, float]:
        """Every rollout engine holds ``version`` when this returns. ``{"seconds", "bytes", "again"}`` of the push."""
        return self.finish(self.start(version, phases))

    def start(self, version: int, phases: Phases | None = None) -> PushInFlight:
        """The push of ``version``, sent; ``finish`` waits for it. Calls sent ``after=`` its ``landed`` start once
        every engine holds ``version``, unless the push fails (then they fail too, and ``finish`` says ``again``)."""
        phases = phases or Phases()
        return PushInFlight(version, self._send(version, phases), phases, time.perf_counter())

    def finish(self, push: PushInFlight) -> dict[str, float]:
        again = False
        try:
            nbytes = self._check(push.version, push.pending)
        except RoleGroupError:
            # A rollout engine that dies mid-push fails learner rank 0's call to it; once Ray has restarted it, the
            # whole push is repeated (every engine gets the same bytes again, cheaper than tracking who got what).
            self.restoring = True
            try:
                if not self.rollout.restarted():
                    raise
            finally:
                self.restoring = False
            nbytes, again = self._push(push.version, push.phases), True
        return {"seconds": time.perf_counter() - push.t0, "bytes": float(nbytes), "again": again}

    def _push(self, version: int, phases: Phases) -> int:
        return self._check(version, self._send(version, phases))

    def _send(self, version: int, phases: Phases) -> Pending:
        pending = phases.call(self.policy, "push_weights", version)
        if self.name != "in_process":
            chain = f"{self.rollout.name} (driven by policy.push_weights)"
            phases.record(self.rollout.name, *ROLLOUT_UPDATE, chain=chain)
        return pending

    def _check(self, version: int, pending: Pending) -> int:
        # rank 0 reports every engine (the others None); in process, every rank its own
        reports = [r for r in pending.get() if r is not None]
        versions, nbytes = [v for vs, _ in reports for v in vs], sum(n for _, n in reports)
        if set(versions) != {version}:
            raise RuntimeError(f"weight sync: rollout actors report versions {versions}, expected {version}")
        self.version = version
        return nbytes


@dataclass
class PushInFlight:
    version: int
    pending: Pending  # push_weights on every learner
    phases: Phases
    t0: float

    @property
    def landed(self) -> ray.ObjectRef:
        """Learner rank 0's answer: it exists once every engine holds ``version`` (rank 0 drives them all; in process,
        each rank loads its own engine before any later call on that actor runs)."""
        return self.pending.refs[0]
