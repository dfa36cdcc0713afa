"""The learner's end of weight sync: one sender per transport, all driving the rollout engines through the same
control plane (``client.py``: init, start, update, finish with the version) and all collective over the learner
group: every rank iterates the full weights (a gather under ZeRO-3), rank 0 sends.

- ``object_store``: rank 0 packs buckets (``buckets.py``) into the Ray object store once; every rollout actor
  reads them there and loads them through its engine (vLLM: our backend registered with vLLM's factory).
- ``nccl``, ``cuda_ipc``, ``sparse_nccl``: vLLM's own trainer-side engines (``vllm_senders.py``), which vLLM keeps
  in step with its worker side across releases.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_dist.engines.weight_sync.buckets import bucket_to_numpy, pack_buckets

TRANSPORTS = ("object_store", "nccl", "cuda_ipc", "sparse_nccl")
# the vLLM weight-transfer backend each transport needs on the engine side
VLLM_BACKEND = {"object_store": "rlhf_object_store", "nccl": "nccl", "cuda_ipc": "ipc", "sparse_nccl": "sparse_nccl"}


class ObjectStoreSender:
    def __init__(self, client, is_sender: bool, train_engine, bucket_bytes: int):
        self.client, self.is_sender, self.train_engine, self.bucket_bytes = (
            client,
            is_sender,
            train_engine,
            bucket_bytes,
        )

    def send_weights(self) -> int:
        """Returns the bytes sent (0 on the ranks that only took part in the gather)."""
        named = self.train_engine.named_full_parameters()
        if not self.is_sender:
            for _ in named:  # drive the gathers
                pass
            return 0
        buckets = [bucket_to_numpy(b) for b in pack_buckets(named, self.bucket_bytes)]
        self.client.update({"buckets": buckets})
        return sum(b.flat.nbytes for b in buckets)


def make_sender(
    transport: str,
    client,
    rank: int,
    train_engine,
    bucket_bytes: int,
    rendezvous: Callable[[], tuple[str, int]],
    world_size: int,
):
    """Called on every learner rank. ``rendezvous`` gives rank 0's (address, free port) for an NCCL group of
    ``world_size`` members (learner rank 0 and every rollout worker)."""
    if transport == "object_store":
        return ObjectStoreSender(client, rank == 0, train_engine, bucket_bytes)
    if transport not in TRANSPORTS:
        raise ValueError(f"weight sync: unknown transport {transport!r}; use one of {TRANSPORTS}")
    from rlhf_dist.engines.weight_sync.vllm_senders import make_vllm_sender  # deferred: vllm

    return make_vllm_sender(transport, client, rank, train_engine, bucket_bytes, rendezvous, world_size)
