"""The reward role: a reward model, a user's reward function, or both summed with weights."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.config import resolve_function
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch, to_sequences
from rlhf_dist.data.synthetic import gold_reward
from rlhf_dist.models.load import load_reward_model, load_tokenizer
from rlhf_dist.models.logprobs import sequence_scores
from rlhf_dist.workers.common import derive_seed, device, setup_process


class RewardWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        setup_process(derive_seed(cfg.seed, 2, rank), cfg.roles.reward.num_cpus)
        self.cfg = cfg
        self.function = resolve_function("reward.function", cfg.reward.function) if cfg.reward.function else None
        self.model = self.pad_token_id = None
        if cfg.model.reward:
            self.model = load_reward_model(cfg.model.reward, dtype=cfg.model.dtype).to(device()).eval()
            self.pad_token_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy).pad_token_id
        self.gold = None
        if cfg.data.task == "synthetic":
            self.gold = gold_reward

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Returns the columns ``reward`` and ``gold_reward`` (NaN where the task has no gold scorer)."""
        prompts = batch.column(S.PROMPT_TEXT).to_pylist()
        responses = batch.column(S.RESPONSE_TEXT).to_pylist()
        reward = np.zeros(len(prompts), np.float32)
        if self.function is not None:
            values = np.asarray(self.function(prompts, responses), dtype=np.float32)
            if values.shape != (len(prompts),):
                raise ValueError(
                    f"reward.function {self.cfg.reward.function!r} returned shape {values.shape}, "
                    f"expected one float per response ({len(prompts)})"
                )
            reward += self.cfg.reward.function_weight * values
        if self.model is not None:
            reward += self.cfg.reward.model_weight * self.model_scores(batch)
        if self.cfg.reward.clip is not None:
            reward = np.clip(reward, -self.cfg.reward.clip, self.cfg.reward.clip)
        gold = (
            np.asarray([self.gold(p, r) for p, r in zip(prompts, responses)], np.float32)
            if self.gold is not None
            else np.full(len(prompts), math.nan, np.float32)
        )
        return make_batch({S.REWARD: reward, S.GOLD_REWARD: gold})

    @torch.no_grad()
    def model_scores(self, batch: pa.RecordBatch) -> np.ndarray:
        seqs = to_sequences(batch, self.pad_token_id).to(device())
        scores = sequence_scores(self.model, seqs.input_ids, seqs.attention_mask, seqs.last_token_index())
        return scores.float().cpu().numpy()
