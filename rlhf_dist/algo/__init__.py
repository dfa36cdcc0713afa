"""RL math for RLHF: pure functions on tensors (no Ray, no engines).

masked      masked reductions and mask checks
advantages  GAE, GRPO, RLOO, REINFORCE++, token rewards from scores
kl          KL estimators k1/k2/k3, KL-penalised rewards, fixed and adaptive KL controllers
losses      PPO policy / value losses, entropy, Bradley-Terry, DPO/IPO, truncated IS weights
off_policy  decoupled PPO for stale or mismatched samples, with truncated or IcePop-masked importance weights
nonfinite   which samples hold a NaN or inf, the first and how many
"""

from rlhf_dist.algo.advantages import (
    gae_advantages_and_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_rewards_from_scores,
)
from rlhf_dist.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
)
from rlhf_dist.algo.losses import (
    LOSS_AGGS,
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    masked_entropy,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)
from rlhf_dist.algo.masked import (
    as_bool_mask,
    check_right_padded,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_mask,
    response_lengths,
)
from rlhf_dist.algo.nonfinite import NonFiniteError, first_and_count, nonfinite_rows, whole_groups, zero_rows
from rlhf_dist.algo.off_policy import OFF_POLICY_CORRECTIONS, decoupled_ppo_loss, icepop_weights

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "NonFiniteError",
    "OFF_POLICY_CORRECTIONS",
    "aggregate_loss",
    "as_bool_mask",
    "bradley_terry_loss",
    "check_right_padded",
    "decoupled_ppo_loss",
    "dpo_loss",
    "entropy_from_logits",
    "first_and_count",
    "gae_advantages_and_returns",
    "grpo_advantages",
    "icepop_weights",
    "kl_estimate",
    "kl_penalized_rewards",
    "masked_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nonfinite_rows",
    "per_token_mask",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_returns",
    "response_lengths",
    "rloo_advantages",
    "token_rewards_from_scores",
    "truncated_is_weights",
    "value_loss",
    "whole_groups",
    "zero_rows",
]
