"""Moving the policy's weights into the rollout engines, one push per iteration, versioned.

Transports share one shape: every learner rank takes part in gathering the full weights (a collective under ZeRO-3),
rank 0 sends them in buckets, every rollout actor loads them and records the version.
"""
from __future__ import annotations

import time

from rlhf_dist.distributed.role_group import RoleGroup


class ObjectStoreSync:
    """Rank 0's buckets go into the object store once; each rollout actor's node fetches them once.

    The driver passes only the object reference along, so the bytes never travel through it.
    """

    name = "object_store"

    def __init__(self, policy: RoleGroup, rollout: RoleGroup, bucket_mb: int):
        self.policy, self.rollout, self.bucket_mb = policy, rollout, bucket_mb

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        exported = self.policy.call("export_weights", self.bucket_mb)
        payload = exported.refs[0]  # rank 0's; the other ranks only took part in the gather
        loaded = self.rollout.call("load_weights", payload, version)
        exported.get()
        _check_versions(loaded.get(), version)
        return {"time/weight_sync": time.perf_counter() - t0}


def _check_versions(versions: list[int], version: int) -> None:
    if set(versions) != {version}:
        raise RuntimeError(f"weight sync: rollout actors report versions {versions}, expected {version}")


class NcclSync:
    """Learner rank 0 broadcasts buckets straight into every vLLM worker (GPUs, across nodes). UNTESTED here."""

    name = "nccl"

    def __init__(self, policy: RoleGroup, rollout: RoleGroup, bucket_mb: int, tensor_parallel_size: int):
        self.policy, self.rollout, self.bucket_mb = policy, rollout, bucket_mb
        self.plan = policy.call_rank(0, "weight_bucket_plan", bucket_mb).get()[0]
        world_size = 1 + len(rollout) * tensor_parallel_size
        addr, port = policy.call_rank(0, "rendezvous_address").get()[0]
        # every member must be joining at once: the group forms when all have arrived
        joins = [policy.call("init_weight_broadcast", addr, port, world_size)]
        joins += [
            rollout.call_rank(i, "init_weight_broadcast", addr, port, 1 + i * tensor_parallel_size, world_size)
            for i in range(len(rollout))
        ]
        for j in joins:
            j.get()

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        received = self.rollout.call("receive_weight_broadcast", self.plan, version)
        sent = self.policy.call("broadcast_weights", self.bucket_mb)
        nbytes = sent.get()[0]
        _check_versions(received.get(), version)
        return {"time/weight_sync": time.perf_counter() - t0, "weight_sync_bytes": float(nbytes)}


class CudaIpcSync:
    """Policy and rollout share GPUs: handles, not bytes, travel through the object store. UNTESTED here."""

    name = "cuda_ipc"

    def __init__(self, policy: RoleGroup, rollout: RoleGroup, bucket_mb: int):
        self.policy, self.rollout, self.bucket_mb = policy, rollout, bucket_mb

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        exported = self.policy.call("ipc_weight_handles", self.bucket_mb)
        handles = exported.refs[0]
        _check_versions(self.rollout.call("receive_weight_ipc", handles, version).get(), version)
        exported.get()
        return {"time/weight_sync": time.perf_counter() - t0}


def make_weight_sync(cfg, policy: RoleGroup, rollout: RoleGroup):
    """``auto``: CUDA IPC when policy and rollout share GPUs, NCCL when both have GPUs, else the object store."""
    transport = cfg.sync.transport
    roles = cfg.roles
    if transport == "auto":
        on_gpu = roles.policy.num_gpus > 0 and roles.rollout.num_gpus > 0 and cfg.generation.engine == "vllm"
        colocated = roles.anchor("policy") == roles.anchor("rollout")
        transport = ("cuda_ipc" if colocated else "nccl") if on_gpu else "object_store"
    if transport == "nccl":
        return NcclSync(policy, rollout, cfg.sync.bucket_mb, cfg.generation.tensor_parallel_size)
    if transport == "cuda_ipc":
        return CudaIpcSync(policy, rollout, cfg.sync.bucket_mb)
    return ObjectStoreSync(policy, rollout, cfg.sync.bucket_mb)
