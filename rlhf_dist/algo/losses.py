"""Losses: PPO policy (clip, dual clip, asymmetric clip), clipped value, entropy, Bradley-Terry, DPO/IPO, and the
truncated importance-sampling weights for rollout/learner mismatch.

Per-token tensors are `[batch, response_len]`; `mask` 1 = a real response token. Stats are detached 0-d tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_dist.algo.masked import masked_mean, per_token_mask

__all__ = [
    "LOSS_AGGS",
    "aggregate_loss",
    "ppo_policy_loss",
    "value_loss",
    "entropy_from_logits",
    "masked_entropy",
    "bradley_terry_loss",
    "dpo_loss",
    "truncated_is_weights",
]

LOSS_AGGS = ("token_mean", "seq_mean")


def _zero_pad(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def aggregate_loss(losses: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """Reduce per-token losses `[batch, response_len]` to a scalar.

    "token_mean": mean over all real tokens of the batch (every token weighs the same; long rows weigh more).
    "seq_mean": mean over non-empty rows of each row's token mean (every sample weighs the same).
    No real token at all gives 0 (still attached to the graph).
    """
    if loss_agg == "token_mean":
        return masked_mean(losses, mask)
    if loss_agg == "seq_mean":
        m = per_token_mask(mask, losses=losses)
        per_row = masked_mean(losses, m, dim=1)
        nonempty = m.any(dim=1)
        return _zero_pad(per_row, nonempty).sum() / nonempty.sum().clamp(min=1).to(losses.dtype)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    clip_eps_high: float | None = None,
    loss_agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), per token, as a loss to minimise.

    logprobs (current policy, carries the gradient), old_logprobs (behaviour policy), advantages, mask:
    `[batch, response_len]`. old_logprobs and advantages are detached here.
    ratio = exp(logprobs - old_logprobs); pg_loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
    with clip_eps_high = clip_eps unless given (DAPO's "clip higher").
    dual_clip (Ye et al. 2020, > 1): for A < 0 the loss is also capped at -dual_clip * A, so a huge ratio on a bad
    token cannot blow up the loss.
    loss_agg: "token_mean" (default: masked mean over all real tokens of the batch) or "seq_mean".
    Returns (loss, stats) with stats clip_frac (share of real tokens where the clipped term is active),
    dual_clip_frac, approx_kl (k3 estimate of KL(old || new): (ratio - 1) - log ratio), ratio_mean.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if clip_eps_high is not None and clip_eps_high <= 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip}")
    m = per_token_mask(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    # Zero padded inputs before exp so garbage there cannot make NaN in the loss or the gradient.
    log_ratio = _zero_pad(logprobs, m) - _zero_pad(old_logprobs.detach(), m)
    advantages = _zero_pad(advantages.detach(), m)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    pg_losses = torch.max(pg_losses1, pg_losses2)
    if dual_clip is not None:
        pg_losses3 = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (pg_losses3 < pg_losses)
        pg_losses = torch.where(advantages < 0, torch.min(pg_losses, pg_losses3), pg_losses)
    else:
        dual_clipped = torch.zeros_like(m)
    loss = aggregate_loss(pg_losses, m, loss_agg)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((pg_losses2 > pg_losses1).to(ratio.dtype), m),
            "dual_clip_frac": masked_mean(dual_clipped.to(ratio.dtype), m),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    loss_agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss: 0.5 * (V - R)^2, or with clip_eps the PPO2 pessimistic clipped form
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip_eps, clip_eps) - R)^2).

    values (carry the gradient), old_values (at rollout time), returns (targets), mask: `[batch, response_len]`;
    old_values and returns are detached. Returns (loss, stats) with stats clip_frac (share of real tokens where the
    clipped term is the larger one; 0 without clipping).
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    m = per_token_mask(mask, values=values, old_values=old_values, returns=returns)
    values = _zero_pad(values, m)
    old_values = _zero_pad(old_values.detach(), m)
    returns = _zero_pad(returns.detach(), m)
    v_loss_unclipped = (values - returns) ** 2
    if clip_eps is None:
        v_losses = v_loss_unclipped
        clipped = torch.zeros_like(m)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_losses = torch.max(v_loss_unclipped, v_loss_clipped)
        clipped = v_loss_clipped > v_loss_unclipped
    loss = 0.5 * aggregate_loss(v_losses, m, loss_agg)
    return loss, {"clip_frac": masked_mean(clipped.to(values.dtype), m).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: `[batch, response_len, vocab]` -> `[batch, response_len]`.

    Computed in float32 from log_softmax (no overflow for large logits); -inf logits (masked vocabulary) contribute
    0, not NaN, to the value and the gradient.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary axis, got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))).sum(-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy over real tokens (token-level mean): logits `[batch, response_len, vocab]`, mask
    `[batch, response_len]` -> 0-d tensor (0 if no real token)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, response_len, vocab], got shape {tuple(logits.shape)}")
    entropy = entropy_from_logits(logits)
    m = per_token_mask(mask, entropy=entropy)
    return masked_mean(entropy, m)


def _check_per_sample(**tensors: torch.Tensor) -> int:
    sizes = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D [batch] tensor, got {getattr(t, 'shape', type(t).__name__)}")
        sizes.add(t.shape[0])
    if len(sizes) != 1:
        got = {k: v.shape[0] for k, v in tensors.items()}
        raise ValueError(f"per-sample inputs must share one batch size, got {got}")
    batch = sizes.pop()
    if batch == 0:
        raise ValueError("empty batch: the loss would be a mean over nothing")
    return batch


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model loss under the Bradley-Terry model: mean of -log sigmoid(r_chosen - r_rejected - margin).

    chosen_scores, rejected_scores: `[batch]`; margin: None, a float, or `[batch]` (Llama 2's preference margin).
    Returns (loss, accuracy), accuracy = share of pairs with r_chosen > r_rejected (detached).
    """
    _check_per_sample(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() > 0 and tuple(margin.shape) != tuple(diff.shape):
            raise ValueError(f"margin must be a scalar or [batch]={diff.shape[0]}, got shape {tuple(margin.shape)}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen_scores > rejected_scores).to(chosen_scores.dtype).mean().detach()
    return loss, accuracy


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023).

    All inputs `[batch]`: log-probs of the whole response summed over its tokens; ref_* are detached.
    logits = (pi_c - pi_r) - (ref_c - ref_r).
    "sigmoid": -(1 - ls) * log sigmoid(beta * logits) - ls * log sigmoid(-beta * logits)  (ls = label_smoothing,
               conservative DPO / cDPO, must be in [0, 0.5));
    "ipo":     (logits - 1 / (2 * beta))^2  (label smoothing not defined; must be 0).
    Returns (loss (mean over the batch), chosen_rewards, rejected_rewards) with the implicit rewards
    beta * (pi - ref) per sample, detached.
    """
    _check_per_sample(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    ref_chosen_logps = ref_chosen_logps.detach()
    ref_rejected_logps = ref_rejected_logps.detach()
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is only defined for loss_type='sigmoid'; set it to 0 for 'ipo'")
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def truncated_is_weights(
    logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights for rollout/learner mismatch (veRL/OpenRLHF "TIS", Yao et al. 2025).

    logprobs: the learner's log-probs of the sampled tokens (at the behaviour weights); rollout_logprobs: what the
    rollout engine (e.g. vLLM) reported for the same tokens; mask: `[batch, response_len]`.
    w_t = min(exp(logprobs - rollout_logprobs), cap), detached (a constant per-token factor on the policy loss);
    0 at padding.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    m = per_token_mask(mask, logprobs=logprobs, rollout_logprobs=rollout_logprobs)
    with torch.no_grad():
        log_w = _zero_pad(logprobs, m) - _zero_pad(rollout_logprobs, m)
        weights = torch.clamp(torch.exp(log_w), max=cap)
        return _zero_pad(weights, m)
