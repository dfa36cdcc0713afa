"""The reward role: a reward model, a user's reward function, a remote reward service, or a weighted sum of them."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.algo import NonFiniteError
from rlhf_dist.config import resolve_function
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch, to_sequences
from rlhf_dist.data.synthetic import gold_reward
from rlhf_dist.engines.reward_client import RewardClient
from rlhf_dist.engines.served_reward import ServedReward
from rlhf_dist.models.logprobs import sequence_scores
from rlhf_dist.workers.common import derive_seed, device, setup_process


class RewardWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        setup_process(derive_seed(cfg.seed, 2, rank), cfg.roles.reward.num_cpus)
        self.cfg = cfg
        self.function = resolve_function("reward.function", cfg.reward.function) if cfg.reward.function else None
        self.model = self.pad_token_id = self.served = None
        if cfg.model.reward and cfg.reward.serve.enabled:  # the model lives in a Ray Serve deployment
            s = cfg.reward.serve
            self.served = ServedReward(s.name, s.batch_size, s.timeout_s)
        elif cfg.model.reward:
            from rlhf_dist.models.load import load_reward_model, load_tokenizer  # deferred: transformers

            self.model = load_reward_model(cfg.model.reward, dtype=cfg.model.dtype).to(device()).eval()
            self.pad_token_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy).pad_token_id
        self.endpoint = RewardClient.from_config(cfg.reward) if cfg.reward.endpoint else None
        self.gold = None
        if cfg.data.task == "synthetic":
            self.gold = gold_reward

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Returns the columns ``reward`` and ``gold_reward`` (NaN where the task has no gold scorer).

        A source returning NaN or inf stops the run (``train.on_nonfinite=stop``), or (``skip``) leaves that sample's
        reward NaN, whatever the clip and the other source say, for the driver to drop it from training.
        """
        prompts = batch.column(S.PROMPT_TEXT).to_pylist()
        responses = batch.column(S.RESPONSE_TEXT).to_pylist()
        reward = np.zeros(len(prompts), np.float32)
        bad = np.zeros(len(prompts), bool)
        if self.function is not None:
            values = np.asarray(self.function(prompts, responses), dtype=np.float32)
            if values.shape != (len(prompts),):
                raise ValueError(
                    f"reward.function {self.cfg.reward.function!r} returned shape {values.shape}, "
                    f"expected one float per response ({len(prompts)})"
                )
            bad |= self.check_finite(values, f"reward.function {self.cfg.reward.function!r}", batch)
            reward += self.cfg.reward.function_weight * values
        if self.model is not None or self.served is not None:
            scores = self.model_scores(batch)
            bad |= self.check_finite(scores, f"the reward model {self.cfg.model.reward!r}", batch)
            reward += self.cfg.reward.model_weight * scores
        if self.endpoint is not None:
            values = self.endpoint.score(prompts, responses)
            bad |= self.check_finite(values, f"reward.endpoint {self.cfg.reward.endpoint}", batch)
            reward += self.cfg.reward.endpoint_weight * values
        if self.cfg.reward.clip is not None:
            reward = np.clip(reward, -self.cfg.reward.clip, self.cfg.reward.clip)
        if bad.any():  # clipping would turn an inf into a plausible reward
            reward[bad] = np.nan
        gold = (
            np.asarray([self.gold(p, r) for p, r in zip(prompts, responses)], np.float32)
            if self.gold is not None
            else np.full(len(prompts), math.nan, np.float32)
        )
        return make_batch({S.REWARD: reward, S.GOLD_REWARD: gold})

    def check_finite(self, values: np.ndarray, source: str, batch: pa.RecordBatch) -> np.ndarray:
        """The non-finite samples of ``values``; with ``train.on_nonfinite=stop`` any of them stops the run."""
        if self.cfg.train.on_nonfinite == "stop":
            check_finite(values, source, batch)
        return ~np.isfinite(values)

    @torch.no_grad()
    def model_scores(self, batch: pa.RecordBatch) -> np.ndarray:
        if self.served is not None:
            return self.served.score(batch)
        seqs = to_sequences(batch, self.pad_token_id).to(device())
        scores = sequence_scores(self.model, seqs.input_ids, seqs.attention_mask, seqs.last_token_index())
        return scores.float().cpu().numpy()


class NonFiniteRewardError(NonFiniteError):
    """A reward source returned NaN or inf: training on it would skip every step and save the unchanged policy."""


def check_finite(values: np.ndarray, source: str, batch: pa.RecordBatch) -> None:
    """One line naming the source, the first bad sample and how many there are."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        sample = batch.column(S.SAMPLE_ID)[i].as_py() if S.SAMPLE_ID in batch.schema.names else i
        response = batch.column(S.RESPONSE_TEXT)[i].as_py()
        raise NonFiniteRewardError(
            f"{source} returned {values[i]} for sample {sample} (response {response[:60]!r}), {bad.size} of "
            f"{len(values)} non-finite in this batch; make it return finite floats for every response (or set "
            "train.on_nonfinite=skip to train without such samples)"
        )
