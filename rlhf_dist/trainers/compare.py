"""Policies side by side on the same held-out prompts: gold reward, reward-model score, KL to the SFT model.

Every policy answers the same prompts twice: greedily, and `pipeline.eval_samples` times by sampling with the same
fixed seeds. On its samples we measure
- gold reward (the synthetic task's hidden score; NaN for other tasks), greedy and sampled;
- the reward model's score (what PPO optimised: a gap between it and gold is reward hacking);
- KL to the SFT model: mean over sampled tokens of log pi(token) - log pi_sft(token), a Monte Carlo estimate of
  the per-token KL(pi || pi_sft) on the policy's own samples (the sampler's log-probs against the reference
  actors' for the same tokens, both at generation.temperature);
- distinct-1/2 of the sampled responses and each policy's win rate against the SFT model under the reward model
  (ties half), the same measures as `rlhf-dist eval` (eval_metrics.py).
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_batches, repeat_interleave
from rlhf_dist.data.datasets import DataError
from rlhf_dist.data.prompts import read_prompt_texts, tokenize_prompts
from rlhf_dist.data.synthetic import make_prompts
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.orchestration.learner_groups import worker_group
from rlhf_dist.trainers import eval_metrics
from rlhf_dist.trainers.eval_metrics import nanmean, sample_metrics, win_rate
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
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("win_rate_vs_sft", "win vs SFT (RM)"),
)


def held_out_prompts(cfg: RunConfig, tokenizer) -> pa.RecordBatch:
    """data.eval_prompts prompts no training stage sees: eval.prompts' first rows, or the synthetic task's own held-out
    stream. Every row of data.prompts is a training prompt, so a prompts task without eval.prompts is a ConfigError
    rather than an evaluation on prompts the policy trained on."""
    n = cfg.data.eval_prompts
    if cfg.eval.prompts:
        texts = eval_prompt_texts(cfg)[:n]
    elif cfg.data.task == "synthetic":
        texts = make_prompts(n, seed=derive_seed(cfg.seed, EVAL_ITERATION))
    else:
        raise ConfigError(
            "eval.prompts",
            f"not set, and every row of data.prompts ({cfg.data.prompts}) is a training prompt, so none is held out; "
            "set eval.prompts=FILE of prompts training does not read (the README's walkthrough splits one file in two)",
        )
    return concat_batches([tokenize_prompts(texts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)])


def eval_prompt_texts(cfg: RunConfig) -> list:
    """Every row of eval.prompts, read like data.prompts (errors name eval.prompts)."""
    data = dataclasses.replace(cfg.data, task="prompts", prompts=cfg.eval.prompts)
    try:
        return read_prompt_texts(dataclasses.replace(cfg, data=data))
    except DataError as err:  # the reader names data.prompts, which here is eval.prompts
        raise DataError(str(err).replace("data.prompts", "eval.prompts", 1)) from None


def compare(
    cfg: RunConfig, policies: dict[str, str], sft: str, reward_model: str | None
) -> dict[str, dict[str, float]]:
    """{policy name: metrics} for every policy dir in `policies` (Ray must be up)."""
    # The scorers: the SFT model as the KL reference, the reward model (and gold) as the reward actors.
    cfg = with_model(cfg, policy=sft, reference=sft, reward=reward_model)
    # one set of rollout actors for every policy, each loaded in turn (``load_policy``: through the object store's
    # path into the engine, whatever transport training used); the SFT model's weights to start
    cfg = dataclasses.replace(
        cfg,
        reward=dataclasses.replace(cfg.reward, function=None, endpoint=None, model_weight=1.0, clip=None),
        sync=dataclasses.replace(cfg.sync, transport="object_store"),
    )
    prompts = held_out_prompts(cfg, load_tokenizer(cfg.model.tokenizer or sft))
    results, rm_scores = {}, {}
    with (
        worker_group("reference", ReferenceWorker, cfg, cfg.roles.reference) as reference,
        worker_group("reward", RewardWorker, cfg, cfg.roles.reward) as reward,
        worker_group("rollout", RolloutWorker, cfg, cfg.roles.rollout) as rollout,
    ):
        for name, path in policies.items():
            rollout.call("load_policy", path).get()
            greedy = rollout.scatter("generate", prompts, EVAL_ITERATION, greedy=True)
            sampled = rollout.scatter("generate", repeat_interleave(prompts, cfg.pipeline.eval_samples), EVAL_ITERATION)
            greedy, sampled = greedy.batch(), sampled.batch()
            scores_greedy, scores = reward.scatter("score", greedy), reward.scatter("score", sampled)
            ref, scores = reference.scatter("logprobs", sampled).batch(), scores.batch()
            results[name] = policy_metrics(sampled, scores, scores_greedy.batch(), ref, reward_model)
            rm_scores[name] = scores.column(S.REWARD).to_numpy(zero_copy_only=False)
    for name, m in results.items():  # every policy sampled the same prompts with the same seeds: paired samples
        paired = reward_model is not None and "sft" in rm_scores
        m["win_rate_vs_sft"] = win_rate(rm_scores[name], rm_scores["sft"]) if paired else math.nan
    return results


def policy_metrics(
    sampled: pa.RecordBatch,
    scores: pa.RecordBatch,
    scores_greedy: pa.RecordBatch,
    ref: pa.RecordBatch,
    reward_model: str | None,
) -> dict[str, float]:
    m = sample_metrics(sampled, scores, ref, "k1")  # the sampler's log-probs against the SFT model's
    return {
        "gold_sampled": m["gold"],
        "gold_greedy": nanmean(scores_greedy.column(S.GOLD_REWARD)),
        "rm_score": m["reward"] if reward_model else math.nan,
        "kl_to_sft": m["kl_to_ref"],
        "response_len": m["response_len"],
        "distinct_1": m["distinct_1"],
        "distinct_2": m["distinct_2"],
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    return eval_metrics.format_table(results, COLUMNS)
