"""vLLM's trainer-side weight-transfer engines (NCCL broadcast, CUDA IPC, sparse NCCL deltas) fed by a learner.
Needs vllm and CUDA: UNTESTED on a GPU here (see the README's "verified where"); written to vLLM 0.32's
``vllm.distributed.weight_transfer`` sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from vllm.distributed.weight_transfer import ParamMeta, WeightSource, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
from vllm.distributed.weight_transfer.sparse_nccl_engine import SparseNCCLTrainerInitInfo, SparseWeightPatch


class LearnerWeightSource(WeightSource):
    """The learner's full weights: shapes without a gather, tensors through one (a collective under ZeRO-3, so
    every rank iterates). ``everywhere``: every rank keeps its copy (CUDA IPC shares each GPU's own)."""

    def __init__(self, train_engine, everywhere: bool):
        self.train_engine, self.everywhere = train_engine, everywhere

    def metadata(self) -> list[ParamMeta]:
        return [
            ParamMeta(name, dtype, tuple(shape))
            for name, (shape, dtype) in self.train_engine.full_parameter_shapes().items()
        ]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.train_engine.named_full_parameters(device=self.train_engine.device, rank0_only=not self.everywhere)

    def nbytes(self) -> int:
        return sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in self.metadata())


class VLLMSender:
    """A full resync per push through vLLM's engine; packed into ``bucket_bytes`` buffers, so a push holds one
    bucket (IPC: per rank) beyond the model, and frees it before returning."""

    def __init__(self, engine, source: LearnerWeightSource):
        self.engine, self.source = engine, source

    def send_weights(self) -> int:
        self.engine.send_weights()
        return self.source.nbytes() if self.engine.is_sender else 0


class SparseSender:
    """Deltas: rank 0 keeps a copy of what the engines hold and sends only the elements that changed (the first
    push sends all of them). One extra model copy on rank 0's GPU."""

    def __init__(self, engine, source: LearnerWeightSource, client):
        self.engine, self.source, self.client = engine, source, client
        self.sent: dict[str, torch.Tensor] = {}

    def send_weights(self) -> int:
        patches = []
        for name, tensor in self.source:
            if not self.engine.is_sender:
                continue
            flat, before = tensor.reshape(-1), self.sent.get(name)
            changed = torch.arange(flat.numel(), device=flat.device) if before is None else (flat != before).nonzero()
            index = changed.reshape(-1).to(torch.int32)
            patches.append(SparseWeightPatch(name, index, flat[index.long()].contiguous(), tuple(tensor.shape)))
            self.sent[name] = flat.clone()
        if not self.engine.is_sender:
            return 0
        if any(p.indices.numel() for p in patches):
            self.engine.send_weights([p for p in patches if p.indices.numel()])
        else:  # nothing changed: still one update, so the version moves on
            self.client.start_weight_update()
            self.client.finish_weight_update()
        return sum(p.indices.numel() * 4 + p.values.numel() * p.values.element_size() for p in patches)


def make_vllm_sender(
    transport: str,
    client,
    rank: int,
    train_engine,
    bucket_bytes: int,
    rendezvous: Callable[[], tuple[str, int]],
    world_size: int,
):
    source = LearnerWeightSource(train_engine, everywhere=transport == "cuda_ipc")
    if transport == "cuda_ipc":
        info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
    else:
        address, port = rendezvous() if rank == 0 else ("", 0)  # only rank 0 opens the group
        if transport == "nccl":
            info = NCCLTrainerInitInfo(
                address, port, world_size, rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes
            )
        else:
            info = SparseNCCLTrainerInitInfo(address, port, world_size, rank=rank)
    sparse = transport == "sparse_nccl"  # a delta backend: patches per push, no source at init
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=None if sparse else source)
    return SparseSender(engine, source, client) if sparse else VLLMSender(engine, source)
