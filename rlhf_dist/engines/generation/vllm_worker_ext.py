"""What vLLM's weight-transfer API lacks, mixed into every vLLM worker (``worker_extension_cls``); importable only
inside a vLLM worker process.

- Importing this module registers the object-store backend (``vllm_object_store``) in the worker process, where
  vLLM builds the worker side of weight transfer; a registration in the trainer's process alone is not seen there.
- ``get_weights`` reads the engine's weights back, HF-named, with the dimension each tensor-parallel shard splits,
  so the engine can reassemble them and tests compare them with the learner's bit for bit: the API has no read-back.
"""

from __future__ import annotations

from vllm.model_executor.layers.linear import RowParallelLinear

from rlhf_dist.engines.generation import vllm_object_store

vllm_object_store.register()

# vLLM fuses these HF projections into one parameter; get_weights splits them back (output_sizes order).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class WeightSyncExtension:
    """Methods run on each worker through ``collective_rpc``; ``self`` is the vLLM Worker."""

    def get_weights(self, names: list[str] | None = None) -> dict[str, dict]:
        """HF-named copies of this worker's weights (its shards when tensor parallel), each as
        ``vllm_object_store.tensor_to_wire``: fused projections split back, vocabulary padding cut off.
        Parameters the CPU backend packed away (its linear weights are empty after loading) are left out.
        ``split_dim``: the dimension along which the workers' shards concatenate, None where each holds it whole."""
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
            split = _split_dim(module, leaf)
            for n, p in parts:
                if names is None or n in names:
                    wire = vllm_object_store.tensor_to_wire(p)
                    # bytes: a copy, and picklable (workers pickle results)
                    out[n] = {**wire, "data": bytes(wire["data"]), "split_dim": split}
        return out


def _split_dim(module, leaf: str) -> int | None:
    """Row-parallel layers split their inputs (a bias is whole); column-parallel layers and the vocabulary-parallel
    embedding / head split their outputs."""
    if getattr(module, "tp_size", 1) == 1:
        return None
    if isinstance(module, RowParallelLinear):
        return None if leaf == "bias" else 1
    return 0
