"""The driver's side of weight sync: once per iteration, the learners push their weights into the rollout engines
and the push ends with a version check.

Learner rank 0 drives the engines itself through vLLM's weight-transfer control plane (init, start, update,
finish; rlhf_dist.engines.weight_sync): the bytes never pass through the driver, and every transport (object
store, NCCL, CUDA IPC, sparse NCCL) is the same two calls from here.
"""
from __future__ import annotations

import time

from rlhf_dist.orchestration.role_group import RoleGroup


class WeightPush:
    def __init__(self, cfg, policy: RoleGroup, rollout: RoleGroup):
        self.policy, self.name = policy, cfg.weight_transport()
        workers_per_engine = cfg.generation.tensor_parallel_size if cfg.generation.engine == "vllm" else 1
        policy.call("init_weight_sync", rollout.actors, self.name, workers_per_engine, cfg.sync.bucket_mb,
                    cfg.ray.actor_timeout_s).get()

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        versions, nbytes = self.policy.call("push_weights", version).get()[0]
        if set(versions) != {version}:
            raise RuntimeError(f"weight sync: rollout actors report versions {versions}, expected {version}")
        return {"time/weight_sync": time.perf_counter() - t0, "weight_sync_bytes": float(nbytes)}
