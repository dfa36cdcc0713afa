"""Advantages: hand-worked GAE/GRPO/RLOO/REINFORCE++ numbers and per-row Python-loop references on ragged batches."""

import math
import statistics

import pytest
import torch

from rlhf_dist.algo import (
    gae_advantages_and_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_rewards_from_scores,
)

LENGTHS = [4, 1, 0, 6, 3]  # a short row and an empty row in the middle of the batch
NAN = float("nan")


def ragged(lengths=LENGTHS, seed=0):
    """(rewards, values, mask): random [B, T] float64 with NaN at padding, right-padded bool mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    return rewards, values, mask


def gae_loop(rewards, values, gamma, lam):
    """Plain GAE over one row's real tokens (lists); V after the last token is 0."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_by_hand_with_ragged_rows():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, NAN]])
    values = torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.6, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages_and_returns(rewards, values, mask, gamma, lam)
    # row 0: d2 = 1 + 0.9*0 - 0.2 = 0.8                 A2 = 0.8
    #        d1 = 0 + 0.9*0.2 - 0.4 = -0.22            A1 = -0.22 + 0.72*0.8 = 0.356
    #        d0 = 0 + 0.9*0.4 - 0.5 = -0.14            A0 = -0.14 + 0.72*0.356 = 0.11632
    # row 1 (ends at t=1: bootstrap 0, not the padded NaN):
    #        d1 = 1.0 + 0.9*0 - 0.6 = 0.4              A1 = 0.4
    #        d0 = 0.5 + 0.9*0.6 - 0.3 = 0.74           A0 = 0.74 + 0.72*0.4 = 1.028
    torch.testing.assert_close(adv, torch.tensor([[0.11632, 0.356, 0.8], [1.028, 0.4, 0.0]]))
    # returns = A + V: 0.61632, 0.756, 1.0 | 1.328, 1.0, 0 at padding
    torch.testing.assert_close(ret, torch.tensor([[0.61632, 0.756, 1.0], [1.328, 1.0, 0.0]]))


def test_gae_matches_loop_on_ragged_batch():
    rewards, values, mask = ragged()
    gamma, lam = 0.97, 0.9
    adv, ret = gae_advantages_and_returns(rewards, values, mask, gamma, lam)
    for i, n in enumerate(LENGTHS):
        expected = gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[i, :n].tolist())])
        assert adv[i, n:].tolist() == [0.0] * (mask.shape[1] - n)
        assert ret[i, n:].tolist() == [0.0] * (mask.shape[1] - n)


def test_gae_limits_monte_carlo_and_td():
    rewards, values, mask = ragged(seed=3)
    # lam = 1, gamma = 1: A_t = sum of rewards from t on - V_t (Monte Carlo)
    adv, _ = gae_advantages_and_returns(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(LENGTHS):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        assert adv[i, :n].tolist() == pytest.approx([sum(r[t:]) - v[t] for t in range(n)])
    # lam = 0: A_t = one-step TD error
    adv, _ = gae_advantages_and_returns(rewards, values, mask, 0.9, 0.0)
    for i, n in enumerate(LENGTHS):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]
        assert adv[i, :n].tolist() == pytest.approx([r[t] + 0.9 * v[t + 1] - v[t] for t in range(n)])


def test_gae_rejects_bad_input():
    rewards, values, mask = ragged()
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages_and_returns(rewards, values, mask, 1.5, 0.9)
    with pytest.raises(ValueError, match="values"):
        gae_advantages_and_returns(rewards, values[:, :-1], mask, 0.9, 0.9)
    with pytest.raises(ValueError, match="right-padded"):
        gae_advantages_and_returns(rewards[:1, :2], values[:1, :2], torch.tensor([[0, 1]]), 0.9, 0.9)


def test_grpo_by_hand_unbiased_std_noncontiguous_groups():
    scores = torch.tensor([1.0, 4.0, 2.0, 8.0, 3.0, 0.0])
    group_ids = torch.tensor([7, 3, 7, 3, 7, 3])
    lengths = [2, 3, 0, 1, 3, 2]
    mask = torch.arange(3)[None, :] < torch.tensor(lengths)[:, None]
    adv = grpo_advantages(scores, group_ids, mask, eps=0.0)
    # group 7: [1, 2, 3], mean 2, unbiased std sqrt((1+0+1)/2) = 1        -> -1, 0, 1
    # group 3: [4, 8, 0], mean 4, unbiased std sqrt((0+16+16)/2) = 4      ->  0, 1, -1
    # (a biased std, sqrt(32/3) = 3.27, would give 1.22 instead of 1)
    per_sample = [-1.0, 0.0, 0.0, 1.0, 1.0, -1.0]
    expected = torch.tensor([[a if t < n else 0.0 for t in range(3)] for a, n in zip(per_sample, lengths)])
    torch.testing.assert_close(adv, expected)
    # Dr. GRPO: no std scaling -> score minus group mean
    raw = grpo_advantages(scores, group_ids, mask, scale_by_std=False)
    per_sample = [-1.0, 0.0, 0.0, 4.0, 1.0, -4.0]
    torch.testing.assert_close(raw[:, 0], torch.tensor([a if n else 0.0 for a, n in zip(per_sample, lengths)]))


def test_grpo_matches_loop_and_handles_singletons():
    g = torch.Generator().manual_seed(5)
    B = 11
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    group_ids = torch.tensor([5, 2, 9, 2, 5, 5, 2, 40, 9, 9, 2])  # group 40 is a singleton
    lengths = [3, 1, 0, 5, 2, 5, 0, 4, 1, 2, 3]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    eps = 1e-6
    adv = grpo_advantages(scores, group_ids, mask, eps=eps)
    for i in range(B):
        members = [scores[j].item() for j in range(B) if group_ids[j] == group_ids[i]]
        if len(members) == 1:
            a = 0.0
        else:
            a = (scores[i].item() - statistics.mean(members)) / (statistics.stdev(members) + eps)
        assert adv[i].tolist() == pytest.approx([a if t < lengths[i] else 0.0 for t in range(5)], abs=1e-12)


def test_grpo_rejects_bad_group_ids():
    mask = torch.ones(3, 2)
    with pytest.raises(TypeError, match="integer"):
        grpo_advantages(torch.zeros(3), torch.zeros(3), mask)
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="scores"):
        grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long), mask)


def test_rloo_by_hand_and_loop():
    scores = torch.tensor([1.0, 0.0, 2.0, 4.0, 6.0])
    group_ids = torch.tensor([1, 0, 1, 0, 1])
    lengths = [2, 1, 0, 2, 1]
    mask = torch.arange(2)[None, :] < torch.tensor(lengths)[:, None]
    adv = rloo_advantages(scores, group_ids, mask)
    # group 1: [1, 2, 6] -> 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5
    # group 0: [0, 4]    -> 0 - 4 = -4, 4 - 0 = 4
    # row 2 is empty: its score is in group 1's baseline, but it has no token to credit
    expected = torch.tensor([[-3.0, -3.0], [-4.0, 0.0], [0.0, 0.0], [4.0, 4.0], [4.5, 0.0]])
    torch.testing.assert_close(adv, expected)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(8, generator=g, dtype=torch.float64)
    ids = torch.tensor([3, 1, 3, 1, 1, 3, 8, 8])
    out = rloo_advantages(s, ids, torch.ones(8, 1))
    for i in range(8):
        others = [s[j].item() for j in range(8) if ids[j] == ids[i] and j != i]
        assert out[i, 0].item() == pytest.approx(s[i].item() - sum(others) / len(others))


def test_rloo_rejects_singleton_group():
    with pytest.raises(ValueError, match=r"at least 2.*\[9\]"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4, 9, 4]), torch.ones(3, 2))


def test_reinforce_pp_returns_by_hand_and_loop():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # gamma 0.5, row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5 ; row 1: G0 = 3
    torch.testing.assert_close(
        reinforce_pp_returns(rewards, mask, 0.5), torch.tensor([[1.5, 1.0, 2.0], [3.0, 0.0, 0.0]])
    )
    rewards, _, mask = ragged(seed=7)
    ret = reinforce_pp_returns(rewards, mask, 0.95)
    for i, n in enumerate(LENGTHS):
        r = rewards[i, :n].tolist()
        expected = [sum(0.95 ** (k - t) * r[k] for k in range(t, n)) for t in range(n)]
        assert ret[i, :n].tolist() == pytest.approx(expected)
        assert ret[i, n:].tolist() == [0.0] * (mask.shape[1] - n)


def test_reinforce_pp_advantages_whiten_over_whole_batch():
    rewards, _, mask = ragged(seed=8)
    adv = reinforce_pp_advantages(rewards, mask, 1.0)
    returns = []
    for i, n in enumerate(LENGTHS):
        r = rewards[i, :n].tolist()
        returns.append([sum(r[t:]) for t in range(n)])
    flat = [g for row in returns for g in row]
    mu, sd = statistics.mean(flat), statistics.stdev(flat)
    for i, n in enumerate(LENGTHS):
        assert adv[i, :n].tolist() == pytest.approx([(g - mu) / math.sqrt(sd**2 + 1e-8) for g in returns[i]])
        assert adv[i, n:].tolist() == [0.0] * (mask.shape[1] - n)


def test_token_rewards_from_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    kl_penalty = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, NAN, NAN], [NAN, NAN, NAN], [-0.5, -0.6, NAN]])
    # score on the last REAL token (not the last column); empty row 2 gets nothing; penalty added as given
    expected = torch.tensor([[-0.1, -0.2, 0.7], [1.6, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 3.4, 0.0]])
    torch.testing.assert_close(token_rewards_from_scores(scores, mask, kl_penalty), expected)
    expected = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    torch.testing.assert_close(token_rewards_from_scores(scores, mask), expected)
    # every row empty, and a zero-width batch
    assert torch.equal(token_rewards_from_scores(scores, torch.zeros(4, 3)), torch.zeros(4, 3))
    assert token_rewards_from_scores(scores, torch.zeros(4, 0)).shape == (4, 0)
    with pytest.raises(ValueError, match="scores"):
        token_rewards_from_scores(scores[:3], mask)
