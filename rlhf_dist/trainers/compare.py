"""Policies side by side on the same held-out prompts: gold reward, reward-model score, KL to the SFT model.

Every policy answers the same prompts twice: greedily, and `pipeline.eval_samples` times by sampling with the same
fixed seeds. On its samples we measure
- gold reward (the synthetic task's hidden score; NaN for other tasks), greedy and sampled;
- the reward model's score (what PPO optimised: a gap between it and gold is reward hacking);
- KL to the SFT model: mean over sampled tokens of log pi(token) - log pi_sft(token), a Monte Carlo estimate of
  the per-token KL(pi || pi_sft) on the policy's own samples (the sampler's log-probs against the reference
  actors' for the same tokens, both at generation.temperature).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_batches, repeat_interleave, to_padded
from rlhf_dist.data.prompts import read_prompt_texts, tokenize_prompts
from rlhf_dist.data.synthetic import make_prompts
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.orchestration.learner_groups import worker_group
from rlhf_dist.trainers.offline import with_model
from rlhf_dist.workers.common import derive_seed
from rlhf_dist.workers.reference import ReferenceWorker
from rlhf_dist.workers.reward import RewardWorker
from rlhf_dist.workers.rollout import RolloutWorker

EVAL_ITERATION = 1_000_003  # the generation seed of the comparison: far from any training iteration's
COLUMNS = (
    ("gold_sampled", "gold (sampled)"),
    ("gold_greedy", "gold (greedy)"),
    ("rm_score", "RM score"),
    ("kl_to_sft", "KL to SFT"),
    ("response_len", "length"),
)


def held_out_prompts(cfg: RunConfig, tokenizer) -> pa.RecordBatch:
    """data.eval_prompts prompts no training stage sees: a fresh synthetic stream, or the file's last rows."""
    n = cfg.data.eval_prompts
    texts = (
        make_prompts(n, seed=derive_seed(cfg.seed, EVAL_ITERATION))
        if cfg.data.task == "synthetic"
        else read_prompt_texts(cfg)[-n:]
    )
    return concat_batches([tokenize_prompts(texts, tokenizer, cfg.data.max_prompt_tokens)])


def compare(
    cfg: RunConfig, policies: dict[str, str], sft: str, reward_model: str | None
) -> dict[str, dict[str, float]]:
    """{policy name: metrics} for every policy dir in `policies` (Ray must be up)."""
    # The scorers: the SFT model as the KL reference, the reward model (and gold) as the reward actors.
    cfg = with_model(cfg, policy=sft, reference=sft, reward=reward_model)
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, function=None, model_weight=1.0, clip=None))
    prompts = held_out_prompts(cfg, load_tokenizer(cfg.model.tokenizer or sft))
    results = {}
    with (
        worker_group("reference", ReferenceWorker, cfg, cfg.roles.reference) as reference,
        worker_group("reward", RewardWorker, cfg, cfg.roles.reward) as reward,
    ):
        for name, path in policies.items():
            with worker_group("rollout", RolloutWorker, with_model(cfg, policy=path), cfg.roles.rollout) as rollout:
                greedy = rollout.scatter("generate", prompts, EVAL_ITERATION, greedy=True)
                sampled = rollout.scatter(
                    "generate", repeat_interleave(prompts, cfg.pipeline.eval_samples), EVAL_ITERATION
                )
                greedy, sampled = greedy.batch(), sampled.batch()
            scores_greedy, scores = reward.scatter("score", greedy), reward.scatter("score", sampled)
            ref = reference.scatter("logprobs", sampled).batch()
            results[name] = policy_metrics(sampled, scores.batch(), scores_greedy.batch(), ref, reward_model)
    return results


def policy_metrics(
    sampled: pa.RecordBatch,
    scores: pa.RecordBatch,
    scores_greedy: pa.RecordBatch,
    ref: pa.RecordBatch,
    reward_model: str | None,
) -> dict[str, float]:
    own, mask = to_padded(sampled, S.ROLLOUT_LOGPROBS, dtype=torch.float32)
    sft, _ = to_padded(ref, S.REF_LOGPROBS, dtype=torch.float32)
    tokens = float(mask.sum())
    return {
        "gold_sampled": _mean(scores.column(S.GOLD_REWARD)),
        "gold_greedy": _mean(scores_greedy.column(S.GOLD_REWARD)),
        "rm_score": _mean(scores.column(S.REWARD)) if reward_model else math.nan,
        "kl_to_sft": float(((own - sft) * mask).sum()) / max(1.0, tokens),
        "response_len": tokens / max(1, len(sampled)),
    }


def _mean(column: pa.Array) -> float:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return float(np.nanmean(values)) if len(values) and not np.all(np.isnan(values)) else math.nan


def format_table(results: dict[str, dict[str, float]]) -> str:
    header = f"{'policy':<8}" + "".join(f"{title:>16}" for _, title in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        lines.append(f"{name:<8}" + "".join(f"{m[key]:>16.3f}" for key, _ in COLUMNS))
    return "\n".join(lines)
