"""KL to the reference policy: per-token estimators, KL-penalised rewards, and the KL coefficient controllers.

Sign convention. Tokens are sampled from the policy pi; r = p_ref(x) / pi(x), so
    log r = ref_logprobs - logprobs.
Schulman's estimators of KL(pi || ref) (http://joschu.net/blog/kl-approx.html) for x ~ pi:
    k1 = -log r              = logprobs - ref_logprobs    unbiased, high variance, can be negative
    k2 = 0.5 * (log r) ** 2                                biased, low variance, >= 0
    k3 = (r - 1) - log r                                   unbiased, low variance, >= 0
"""

from __future__ import annotations

import torch

from rlhf_dist.algo.advantages import token_rewards_from_scores
from rlhf_dist.algo.masked import per_token_mask

__all__ = ["KL_ESTIMATORS", "kl_estimate", "kl_penalized_rewards", "FixedKLController", "AdaptiveKLController"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi.

    logprobs (pi), ref_logprobs (frozen reference), mask: `[batch, response_len]`, log-probs of the sampled tokens.
    estimator: "k1" | "k2" | "k3" (see the module docstring). Returns `[batch, response_len]`, 0 at padding.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    m = per_token_mask(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the inputs (not only the output) so -inf log-probs at padding cannot turn gradients into NaN.
    log_r = torch.where(m, ref_logprobs, zero) - torch.where(m, logprobs, zero)
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r**2
    else:
        kl = torch.expm1(log_r) - log_r
    return torch.where(m, kl, zero)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL leash (Ziegler et al. 2019; Stiennon et al. 2020).

    reward_t = -kl_coef * kl_t, plus the row's score on its last real token.
    scores: `[batch]`; logprobs, ref_logprobs, mask: `[batch, response_len]`.
    Returns (token_rewards, kl), both `[batch, response_len]`, 0 at padding; empty rows get nothing.
    """
    if float(kl_coef) < 0:
        raise ValueError(f"kl_coef must be >= 0 (it is subtracted), got {kl_coef}")
    kl = kl_estimate(logprobs, ref_logprobs, mask, estimator)
    return token_rewards_from_scores(scores, mask, -kl_coef * kl), kl


class FixedKLController:
    """A constant KL coefficient; `update` is a no-op so the trainer can treat both controllers alike."""

    def __init__(self, coef: float):
        if float(coef) < 0:
            raise ValueError(f"KL coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences", sec. 2.2).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    KL above target raises the coefficient, below target lowers it.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if float(init_coef) < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if float(target) <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if float(horizon) <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """current_kl: the batch's mean KL per sample (float or 0-d tensor); n_steps: samples in that batch."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
