"""The learner's end of the GPU weight-sync transports. UNTESTED here (no GPU): written to vLLM's and torch's
documented APIs, and kept small; the receiving end is rlhf_dist.engines.generation.vllm_worker_ext.

- NCCL broadcast (GPUs across nodes): learner rank 0 is rank 0 of a group with every vLLM worker; it broadcasts the
  full weights bucket by bucket, in ``plan_buckets`` order, so receivers can allocate each bucket before it arrives.
- CUDA IPC (policy and rollout on the same GPUs): every learner rank packs the full weights on its own GPU and shares
  them by handle; each vLLM worker picks the handle for its device. No copy crosses the PCIe bus.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from rlhf_dist.engines.weight_sync.buckets import pack_buckets, plan_buckets


def bucket_plan(shapes: dict[str, tuple[torch.Size, torch.dtype]], bucket_bytes: int) -> list[list[tuple]]:
    """Per bucket, ``(name, full shape, dtype name)``: what a receiver allocates before rank 0 broadcasts."""
    return [
        [(name, list(shapes[name][0]), str(shapes[name][1]).removeprefix("torch.")) for name in group]
        for group in plan_buckets(shapes, bucket_bytes)
    ]


class BroadcastSender:
    """Rank 0 of the weight-broadcast group (vLLM's StatelessProcessGroup + PyNccl, as its workers use)."""

    def __init__(self, master_address: str, master_port: int, world_size: int, device: torch.device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=0, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=device)
        self.device = device

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> int:
        sent = 0
        for bucket in pack_buckets(named_tensors, bucket_bytes):
            flat = bucket.flat.to(self.device, non_blocking=True)
            self.comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
            sent += flat.numel() * flat.element_size()
        torch.cuda.current_stream().synchronize()
        return sent


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def ipc_handles(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, keep_alive: list) -> list | None:
    """Collective over the learner group. Returns, on rank 0, ``[(uuid -> rebuild args, entries), ...]`` for every
    bucket; the packed buckets are appended to ``keep_alive`` and must live until the receivers have loaded them."""
    from torch.multiprocessing.reductions import reduce_tensor

    device = torch.device("cuda", torch.cuda.current_device())
    uuid = device_uuid(device)
    mine = []
    for bucket in pack_buckets(named_tensors, bucket_bytes):
        flat = bucket.flat.to(device)
        keep_alive.append(flat)
        mine.append(({uuid: reduce_tensor(flat)[1]}, [(e.name, list(e.shape), e.offset, e.numel) for e in bucket.entries]))
    gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    # every rank packed the same buckets in the same order: merge their handles bucket by bucket
    merged = []
    for i, (_, entries) in enumerate(gathered[0]):
        handles: dict = {}
        for rank_buckets in gathered:
            handles.update(rank_buckets[i][0])
        merged.append((handles, entries))
    return merged
