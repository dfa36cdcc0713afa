"""Off-policy correction: the decoupled PPO objective for samples from an older policy (one-step-off, asynchronous
rollouts) or from a rollout engine whose numerics differ from the learner's, with truncated or IcePop-masked
importance weights.

Three log-probs of each sampled token, all `[batch, response_len]`; `mask` 1 = a real response token:
    behaviour  pi_behav  generated the sample: what the rollout engine reported (column `rollout_logprobs`)
    proximal   pi_prox   the learner before this iteration's update (column `old_logprobs`)
    current    pi_theta  the learner now; carries the gradient
Stats are detached 0-d tensors.
"""

from __future__ import annotations

import torch

from rlhf_dist.algo.kl import kl_estimate
from rlhf_dist.algo.losses import _zero_pad, ppo_policy_loss, truncated_is_weights
from rlhf_dist.algo.masked import masked_mean, per_token_mask

__all__ = ["OFF_POLICY_CORRECTIONS", "icepop_weights", "decoupled_ppo_loss"]

OFF_POLICY_CORRECTIONS = ("tis", "icepop")


def _behaviour_ratio(
    proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """k = pi_prox / pi_behav per token, detached; 1 at padding (zeroed inputs)."""
    with torch.no_grad():
        return torch.exp(_zero_pad(proximal_logprobs, m) - _zero_pad(behaviour_logprobs, m))


def icepop_weights(
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    low: float = 0.5,
    high: float = 5.0,
) -> torch.Tensor:
    """IcePop's masked importance weights (Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for
    Trillion-Scale Thinking Model", arXiv:2510.18855; first in the Ant Group blog "Small Leak Can Sink a Great Ship:
    Boost RL Training on MoE with IcePop", Sep 2025).

    k_t = exp(proximal_logprobs - behaviour_logprobs) (the paper's pi_train / pi_infer);
    w_t = M(k_t; low, high) = k_t if low <= k_t <= high, else 0 (the paper's alpha, beta; it uses [0.5, 5]).
    A token outside the band adds neither loss nor gradient, but still counts in the loss's mean (the paper's 1/|y|).
    Inputs `[batch, response_len]`; returns w detached, 0 at padding.
    """
    if not 0 < low < high:
        raise ValueError(f"the IcePop band needs 0 < low < high, got low={low}, high={high}")
    m = per_token_mask(mask, proximal_logprobs=proximal_logprobs, behaviour_logprobs=behaviour_logprobs)
    ratio_pb = _behaviour_ratio(proximal_logprobs, behaviour_logprobs, m)
    return _zero_pad(ratio_pb, m & (ratio_pb >= low) & (ratio_pb <= high))


def decoupled_ppo_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    correction: str = "tis",
    tis_cap: float | None = 2.0,
    icepop_band: tuple[float, float] = (0.5, 5.0),
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    clip_eps_high: float | None = None,
    loss_agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO objective (Hilton et al. 2022, "Batch size-invariance for policy optimization", the decoupled
    clipped objective; AReaL's loss for asynchronous RL, Fu et al. 2025), per token, as a loss to minimise:

        pg_loss = w * max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
        ratio   = pi_theta / pi_prox   the trust region is around the proximal policy, not the stale behaviour one
        w       = pi_prox / pi_behav   importance weight from the behaviour to the proximal policy, detached, made
                                       safe by `correction`: "tis" min(w, tis_cap) (token-level truncated IS,
                                       `truncated_is_weights`) or "icepop" w inside icepop_band, else 0
                                       (`icepop_weights`)

    logprobs (current), proximal_logprobs, behaviour_logprobs, advantages, mask: `[batch, response_len]`.
    w >= 0 is a constant per token, so w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)) (dual clip too): this is
    `ppo_policy_loss` on the advantages w * A; behaviour == proximal gives w = 1 and exactly the plain PPO loss.
    Returns (loss, stats): `ppo_policy_loss`'s stats (clip_frac, dual_clip_frac, approx_kl, ratio_mean; of pi_theta
    against pi_prox) plus is_weight_mean (w over real tokens, after truncation or masking), is_clipped_frac ("tis":
    share of real tokens with pi_prox / pi_behav > tis_cap) or icepop_masked_frac ("icepop": share outside the band),
    behav_kl (k3 estimate of KL(pi_behav || pi_prox): how stale or mismatched the samples are).
    """
    m = per_token_mask(
        mask,
        logprobs=logprobs,
        proximal_logprobs=proximal_logprobs,
        behaviour_logprobs=behaviour_logprobs,
        advantages=advantages,
    )
    if correction == "tis":
        if tis_cap is None:
            raise ValueError("correction='tis' needs tis_cap, the cap on pi_prox / pi_behav (e.g. 2)")
        weights = truncated_is_weights(proximal_logprobs, behaviour_logprobs, mask, tis_cap)
    elif correction == "icepop":
        weights = icepop_weights(proximal_logprobs, behaviour_logprobs, mask, *icepop_band)
    else:
        raise ValueError(f"correction must be one of {OFF_POLICY_CORRECTIONS}, got {correction!r}")
    loss, stats = ppo_policy_loss(
        logprobs,
        proximal_logprobs,
        advantages * weights,
        mask,
        clip_eps=clip_eps,
        dual_clip=dual_clip,
        clip_eps_high=clip_eps_high,
        loss_agg=loss_agg,
    )
    with torch.no_grad():
        ratio_pb = _behaviour_ratio(proximal_logprobs, behaviour_logprobs, m)
        if correction == "tis":
            outside = ratio_pb > tis_cap
            stats["is_clipped_frac"] = masked_mean(outside.to(ratio_pb.dtype), m)
        else:
            outside = (ratio_pb < icepop_band[0]) | (ratio_pb > icepop_band[1])
            stats["icepop_masked_frac"] = masked_mean(outside.to(ratio_pb.dtype), m)
        stats["is_weight_mean"] = masked_mean(weights, m)
        stats["behav_kl"] = masked_mean(kl_estimate(behaviour_logprobs, proximal_logprobs, m, "k3"), m)
    return loss, {k: v.detach() for k, v in stats.items()}
