"""Advantages and returns: GAE (PPO with a critic) and the critic-free family (GRPO, RLOO, REINFORCE++).

Shapes: per-token tensors `[batch, response_len]`, per-sample `[batch]`; `mask` 1 = a real response token, rows
right-padded, possibly empty. Everything here produces training targets, so it runs under `torch.no_grad()`.
"""

from __future__ import annotations

import torch

from rlhf_dist.algo.masked import check_right_padded, masked_whiten, per_token_mask

__all__ = [
    "gae_advantages_and_returns",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_returns",
    "reinforce_pp_advantages",
    "token_rewards_from_scores",
]


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _zero_pad(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def gae_advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), per token.

    rewards, values, mask: `[batch, response_len]`; values[i, t] = V(state before response token t).
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends at each row's last real token, so the bootstrap value after it is 0 (terminal); padded
    positions are never read (they may hold garbage).
    Returns (advantages, returns), both `[batch, response_len]`, returns = advantages + values, 0 at padding.
    """
    m = per_token_mask(mask, rewards=rewards, values=values)
    check_right_padded(m)
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    # Zeroing padded values makes V after the last real token 0: the terminal bootstrap for ragged rows.
    rewards = _zero_pad(rewards, m)
    values = _zero_pad(values, m)
    batch, response_len = rewards.shape
    advantages_reversed = []
    lastgaelam = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(response_len)):
        next_values = values[:, t + 1] if t + 1 < response_len else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    if response_len:
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
    else:
        advantages = torch.zeros_like(rewards)
    advantages = _zero_pad(advantages, m)
    returns = _zero_pad(advantages + values, m)
    return advantages, returns


def _group_index(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate per-sample inputs; return (bool mask, inverse index into the sorted unique group ids)."""
    m = per_token_mask(mask)
    batch = m.shape[0]
    if scores.dim() != 1 or scores.shape[0] != batch:
        raise ValueError(f"scores must be [batch]={batch}, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"group_ids must be [batch]={batch}, got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor (e.g. int64 prompt index), got {group_ids.dtype}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return m, inverse


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, outcome supervision).

    scores: `[batch]` one scalar reward per sample; group_ids: `[batch]` integer, samples of the same prompt share an
    id (any order, not necessarily contiguous); mask: `[batch, response_len]`.
    A_i = (s_i - mean_g) / (std_g + eps), std_g UNBIASED (n - 1), as TRL's GRPOTrainer, OpenRLHF and veRL compute it
    (`tensor.std()`); scale_by_std=False gives A_i = s_i - mean_g (Dr. GRPO, Liu et al. 2025).
    A singleton group has no baseline: its advantage is 0. Empty rows count in their group's statistics (the sample
    was scored) but get no tokens. Returns `[batch, response_len]`: A_i on row i's real tokens, 0 at padding.
    """
    m, inverse = _group_index(scores, group_ids, mask)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=n_groups).to(scores.dtype)
    mean = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores) / counts
    deviation = scores - mean[inverse]
    sq = torch.zeros_like(mean).index_add_(0, inverse, deviation**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    advantages = deviation / (std[inverse] + eps) if scale_by_std else deviation
    return _zero_pad(advantages[:, None].expand(m.shape), m)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    scores: `[batch]`; group_ids: `[batch]` integer (any order); mask: `[batch, response_len]`.
    A_i = s_i - mean of the OTHER samples of i's group = s_i - (sum_g - s_i) / (n_g - 1).
    Raises if a group has fewer than 2 samples. Returns `[batch, response_len]`, A_i on real tokens, 0 at padding.
    """
    m, inverse = _group_index(scores, group_ids, mask)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=n_groups)
    if n_groups and int(counts.min()) < 2:
        small = torch.unique(group_ids[(counts < 2)[inverse]]).tolist()
        raise ValueError(f"RLOO needs at least 2 samples per group; groups {small[:8]} have 1")
    sums = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    baseline = (sums[inverse] - scores) / (counts[inverse] - 1).to(scores.dtype)
    return _zero_pad((scores - baseline)[:, None].expand(m.shape), m)


@torch.no_grad()
def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reward-to-go per token: G_t = r_t + gamma * G_{t+1}, with G = 0 after the last real token.

    token_rewards, mask: `[batch, response_len]`. Returns `[batch, response_len]`, 0 at padding.
    """
    m = per_token_mask(mask, token_rewards=token_rewards)
    check_right_padded(m)
    _check_unit_interval("gamma", gamma)
    rewards = _zero_pad(token_rewards, m)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return _zero_pad(returns, m)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025): reward-to-go whitened over all real tokens of the batch (global batch norm).

    token_rewards (score on the last token plus per-token KL penalty), mask: `[batch, response_len]`.
    Returns `[batch, response_len]`, 0 at padding.
    """
    return masked_whiten(reinforce_pp_returns(token_rewards, mask, gamma), mask)


def token_rewards_from_scores(
    scores: torch.Tensor, mask: torch.Tensor, kl_penalty: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token rewards: each row's score on its last real token, plus a per-token term.

    scores: `[batch]`; mask: `[batch, response_len]` right-padded; kl_penalty: `[batch, response_len]` or None.
    SIGN: `kl_penalty` is ADDED as given, so pass it already negative-signed, e.g. `-kl_coef * kl`.
    Empty rows get no reward at all. Returns `[batch, response_len]`, 0 at padding.
    """
    m = per_token_mask(mask) if kl_penalty is None else per_token_mask(mask, kl_penalty=kl_penalty)
    check_right_padded(m)
    batch = m.shape[0]
    if scores.dim() != 1 or scores.shape[0] != batch:
        raise ValueError(f"scores must be [batch]={batch}, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    dtype = torch.promote_types(scores.dtype, kl_penalty.dtype) if kl_penalty is not None else scores.dtype
    rewards = torch.zeros(m.shape, dtype=dtype, device=scores.device)
    if m.shape[1]:
        lengths = m.sum(-1)
        last = (lengths - 1).clamp(min=0)
        placed = torch.where(lengths > 0, scores.to(dtype), torch.zeros((), dtype=dtype, device=scores.device))
        rewards = rewards.scatter(1, last[:, None], placed[:, None])
    if kl_penalty is not None:
        rewards = rewards + _zero_pad(kl_penalty.to(dtype), m)
    return rewards
