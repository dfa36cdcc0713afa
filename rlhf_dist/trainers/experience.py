"""From a scored batch to advantages and returns: the algorithm's math applied at the driver's tensor edge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.algo import (
    gae_advantages_and_returns,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards_from_scores,
)
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import add_column, from_padded, to_padded


def compute_advantages(batch: pa.RecordBatch, algo, kl_coef: float) -> tuple[pa.RecordBatch, dict[str, float]]:
    """Adds ``advantages`` (and ``returns`` for GAE) to a batch that has rewards, log-probs and (GAE) values.

    The KL leash: with ``algo.kl_mode == "reward"`` every token's reward is ``-kl_coef * kl``, and the sequence score
    lands on the last token; with ``"loss"`` the policy loss carries the KL instead and rewards are the score alone.
    """
    lengths = batch.column(S.RESPONSE_IDS).value_lengths().to_numpy(zero_copy_only=False).copy()
    logprobs, mask = to_padded(batch, S.OLD_LOGPROBS, dtype=torch.float32)
    ref_logprobs, _ = to_padded(batch, S.REF_LOGPROBS, dtype=torch.float32)
    scores = torch.from_numpy(batch.column(S.REWARD).to_numpy(zero_copy_only=False).astype(np.float32))
    mask_f = mask.float()
    kl = kl_estimate(logprobs, ref_logprobs, mask_f, algo.kl_estimator)
    penalty = -kl_coef * kl if algo.kl_mode == "reward" else torch.zeros_like(kl)
    stats = {"kl": float(masked_mean(kl, mask_f)), "kl_coef": kl_coef}

    if algo.estimator == "gae":
        values, _ = to_padded(batch, S.VALUES, dtype=torch.float32)
        rewards = token_rewards_from_scores(scores, mask_f, penalty)
        advantages, returns = gae_advantages_and_returns(rewards, values, mask_f, algo.gamma, algo.lam)
        batch = add_column(batch, S.RETURNS, _ragged(returns, lengths))
        stats["returns_mean"] = float(masked_mean(returns, mask_f))
    elif algo.estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(token_rewards_from_scores(scores, mask_f, penalty), mask_f, algo.gamma)
    else:
        # Group-relative estimators judge a response against its siblings; a per-token KL penalty has no place in
        # a sequence-level baseline, so it is folded in as a sequence sum.
        seq_scores = scores + (penalty * mask_f).sum(dim=1)
        group_ids = torch.from_numpy(batch.column(S.GROUP_ID).to_numpy(zero_copy_only=False).astype(np.int64))
        if algo.estimator == "grpo":
            advantages = grpo_advantages(seq_scores, group_ids, mask_f)
        else:
            advantages = rloo_advantages(seq_scores, group_ids, mask_f)
    if algo.normalize_advantages and algo.estimator in ("gae", "rloo"):
        advantages = masked_whiten(advantages, mask_f)
    stats["advantages_mean"] = float(masked_mean(advantages, mask_f))
    return add_column(batch, S.ADVANTAGES, _ragged(advantages, lengths)), stats


def _ragged(x: torch.Tensor, lengths: np.ndarray) -> pa.Array:
    return from_padded(x.float(), torch.from_numpy(lengths))
