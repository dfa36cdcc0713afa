"""The rollout role: turns prompts into responses with their log-probs, and takes new weights every iteration."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rlhf_dist.comm.errors import StaleStateError
from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import add_column, make_batch
from rlhf_dist.engines.generation.base import GenerationEngine, SamplingConfig
from rlhf_dist.engines.generation.hf import HFGenerationEngine
from rlhf_dist.engines.generation.vllm_engine import VLLMEngine
from rlhf_dist.engines.weight_sync.buckets import bucket_from_numpy
from rlhf_dist.engines.weight_sync.senders import VLLM_BACKEND
from rlhf_dist.models.load import load_causal_lm, load_tokenizer
from rlhf_dist.workers.common import derive_seed, device, setup_process


def make_generation_engine(cfg: RunConfig, tokenizer) -> GenerationEngine:
    gen = cfg.generation
    if gen.engine == "vllm":
        return VLLMEngine(
            model_path=cfg.model.policy,
            dtype=cfg.model.dtype,
            tensor_parallel_size=gen.tensor_parallel_size,
            gpu_memory_utilization=gen.gpu_memory_utilization,
            seed=cfg.seed,
            enable_sleep=gen.enable_sleep,
            max_model_len=cfg.data.max_prompt_tokens + gen.max_new_tokens,
            bucket_bytes=cfg.sync.bucket_mb * 2**20,
            weight_transfer_backend=VLLM_BACKEND[cfg.weight_transport()],
            enforce_eager=gen.enforce_eager,
            per_request_seed=gen.seed_per_request,
        )

    model = load_causal_lm(cfg.model.policy, dtype=cfg.model.dtype, device=device())
    return HFGenerationEngine(
        model, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=gen.batch_size, compile=gen.compile
    )


class RolloutWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        setup_process(derive_seed(cfg.seed, 1, rank), cfg.roles.rollout.num_cpus)
        self.cfg, self.rank = cfg, rank
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
        self.engine = make_generation_engine(cfg, self.tokenizer)
        self.version = 0
        self._update_failed = False  # an update_weights that raised: its finish must not announce the version

    def generate(
        self,
        prompts: pa.RecordBatch,
        iteration: int,
        greedy: bool = False,
        min_version: int | None = None,
        part: int = 0,
    ) -> pa.RecordBatch:
        """Adds response_ids, rollout_logprobs, response_text and policy_version to a batch of prompts; with
        ``min_version``, refuses (``StaleStateError``) unless the engine holds that policy version or a newer one.
        ``part``: which of this actor's calls of the iteration this is (streamed generation), each seeded apart."""
        if min_version is not None and self.version < min_version:
            raise StaleStateError(
                f"rollout actor {self.rank} holds policy version {self.version}, the run is at {min_version}: it "
                f"restarted, or missed a weight push"
            )
        gen = self.cfg.generation
        sampling = SamplingConfig(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            seed=derive_seed(self.cfg.seed, iteration, self.rank, *((part,) if part else ())),
            greedy=greedy,
        )
        out = self.engine.generate(prompts.column(S.PROMPT_IDS).to_pylist(), sampling)
        texts = self.tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        batch = add_column(prompts, S.RESPONSE_IDS, pa.array(out.response_ids, S.TOKENS))
        batch = add_column(batch, S.ROLLOUT_LOGPROBS, pa.array(out.logprobs, S.PER_TOKEN))
        batch = add_column(batch, S.RESPONSE_TEXT, pa.array(texts, pa.string()))
        return add_column(batch, S.POLICY_VERSION, pa.array(np.full(len(texts), self.version, np.int64)))

    def engine_logprobs(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``rollout_logprobs`` of ``batch``'s responses as given (teacher-forced) under the weights this engine
        holds now, and that ``policy_version``: the stale-weight check after a push, where no batch of the pushed
        version has been generated yet."""
        lp = self.engine.response_logprobs(batch, self.cfg.generation.temperature)
        return make_batch({S.ROLLOUT_LOGPROBS: lp, S.POLICY_VERSION: np.full(len(batch), self.version, np.int64)})

    # -- weights in: vLLM's weight-transfer control plane, driven by learner rank 0 (engines/weight_sync) ------
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self._update_failed = False
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        """Object store: ``{"buckets": [NumpyBucket, ...]}`` (fetched once per node); else a vLLM engine's payload."""
        try:
            if "buckets" in update_info:
                self.engine.receive_buckets(bucket_from_numpy(b) for b in update_info["buckets"])
            else:
                self.engine.receive(update_info)
        except BaseException:
            self._update_failed = True
            raise

    def finish_weight_update(self, version: int) -> int:
        """Announces ``version``; refuses after a failed update_weights (the learner may send start, update and
        finish together, so a finish can follow an update that raised)."""
        if self._update_failed:
            raise RuntimeError(
                f"rollout actor {self.rank}: the weight update to version {version} failed (see the error of "
                f"update_weights); the engine keeps version {self.version}"
            )
        self.engine.finish_weight_update()
        self.version = version
        return version

    def load_policy(self, path: str) -> None:
        """Generates from the model saved at ``path`` (the same architecture) from now on: its weights go into the
        running engine as a push brings them, instead of into a new actor (the pipeline's comparison of policies)."""
        model = load_causal_lm(path, dtype=self.cfg.model.dtype)
        self.engine.start_weight_update()
        self.engine.load_weights(model.named_parameters())
        self.engine.finish_weight_update()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def weights(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The engine's weights (for checks that a sync arrived)."""
        return {
            n: t.detach().float().cpu().numpy()
            for n, t in self.engine.named_parameters()
            if names is None or n in names
        }

    def get_version(self) -> int:
        return self.version
