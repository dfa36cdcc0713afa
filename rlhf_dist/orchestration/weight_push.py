"""The driver's side of weight sync: once per iteration, the learners push their weights into the rollout engines
and the push ends with a version check.

Learner rank 0 drives the engines itself through vLLM's weight-transfer control plane (init, start, update,
finish; rlhf_dist.engines.weight_sync): the bytes never pass through the driver, and every transport (object
store, NCCL, CUDA IPC, sparse NCCL) is the same two calls from here.
"""

from __future__ import annotations

import time

from rlhf_dist.config import RunConfig
from rlhf_dist.orchestration.phases import Phases
from rlhf_dist.orchestration.role_group import RoleGroup

# what learner rank 0 calls on every rollout actor during a push (engines/weight_sync/client.py)
ROLLOUT_UPDATE = ("start_weight_update", "update_weights", "finish_weight_update")


class WeightPush:
    def __init__(self, cfg: RunConfig, policy: RoleGroup, rollout: RoleGroup):
        self.policy, self.rollout, self.name = policy, rollout, cfg.weight_transport()
        workers_per_engine = cfg.generation.tensor_parallel_size if cfg.generation.engine == "vllm" else 1
        policy.call(
            "init_weight_sync",
            rollout.actors,
            self.name,
            workers_per_engine,
            cfg.sync.bucket_mb,
            cfg.ray.actor_timeout_s,
        ).get()

    def push(self, version: int, phases: Phases | None = None) -> dict[str, float]:
        """Every rollout engine holds ``version`` when this returns. ``{"seconds", "bytes"}`` of the push."""
        phases = phases or Phases()
        t0 = time.perf_counter()
        pending = phases.call(self.policy, "push_weights", version)
        phases.record(self.rollout.name, *ROLLOUT_UPDATE, chain=f"{self.rollout.name} (driven by policy.push_weights)")
        versions, nbytes = pending.get()[0]
        if set(versions) != {version}:
            raise RuntimeError(f"weight sync: rollout actors report versions {versions}, expected {version}")
        return {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}
