"""Losses: hand-worked PPO / value / entropy / Bradley-Terry / DPO / TIS numbers, a per-token loop reference for
the PPO loss on a ragged batch, and gradients (sign, zero where clipped, none into the old policy)."""

import math

import pytest
import torch

from rlhf_dist.algo import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    masked_entropy,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)

NAN = float("nan")
LN = math.log


def softplus(x):
    return math.log1p(math.exp(x))


def ppo_batch():
    """Four rows: ratios 1.5/0.5 with A = +1, 0.5/1.5 with A = -1, one token ratio 1 with A = 2, one empty row."""
    logprobs = torch.tensor(
        [[LN(1.5), LN(0.5), NAN], [LN(0.5), LN(1.5), NAN], [0.0, NAN, NAN], [NAN, NAN, NAN]], requires_grad=True
    )
    old_logprobs = torch.tensor([[0.0, 0.0, NAN], [0.0, 0.0, NAN], [0.0, NAN, NAN], [NAN, NAN, NAN]])
    advantages = torch.tensor([[1.0, 1.0, NAN], [-1.0, -1.0, NAN], [2.0, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_ppo_policy_loss_by_hand():
    logprobs, old_logprobs, advantages, mask = ppo_batch()
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)   r 0.5, A +1: max(-0.5, -0.8) = -0.5
    #   r 0.5, A -1: max( 0.5,  0.8) =  0.8 (clipped)   r 1.5, A -1: max( 1.5,  1.2) =  1.5
    #   r 1.0, A +2: -2
    # token mean: (-1.2 - 0.5 + 0.8 + 1.5 - 2) / 5 = -1.4 / 5 = -0.28
    assert loss.item() == pytest.approx(-0.28)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    # approx_kl = mean of (r - 1) - ln r: 2 * [(0.5 - ln 1.5) + (-0.5 + ln 2)] / 5
    assert stats["approx_kl"].item() == pytest.approx(2 * ((0.5 - LN(1.5)) + (-0.5 + LN(2))) / 5, rel=1e-5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # seq mean over non-empty rows: row means -0.85, 1.15, -2 -> (-1.7) / 3 (the empty row is not counted)
    loss_seq, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, loss_agg="seq_mean")
    assert loss_seq.item() == pytest.approx(-1.7 / 3)


def test_ppo_policy_gradient_sign_and_clipping():
    logprobs, old_logprobs, advantages, mask = ppo_batch()
    old_logprobs.requires_grad_()
    advantages.requires_grad_()
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    loss.backward()
    # d/d logprob of -A r / N = -A r / N on unclipped tokens, 0 on clipped ones and padding:
    #   (r 0.5, A +1) -> -0.1 (descent raises the logprob of a good token); (r 1.5, A -1) -> +0.3; (r 1, A 2) -> -0.4
    expected = torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.3, 0.0], [-0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)
    assert old_logprobs.grad is None and advantages.grad is None


def test_ppo_dual_clip_and_clip_higher():
    logprobs = torch.tensor([[LN(5.0), LN(2.0), LN(5.0)]], requires_grad=True)
    old_logprobs = torch.zeros(1, 3)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=3.0)
    # r 5, A -1: max(5, 1.2) = 5 -> capped at -3 * A = 3 ; r 2, A -1: 2 < 3 stays ; r 5, A +1: -1.2
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=1.0)
    # clip higher: r 1.5, A +1 is clipped at 1.28, r 0.5, A -1 still at 0.8
    lp = torch.tensor([[LN(1.5), LN(0.5)]])
    loss, _ = ppo_policy_loss(lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)


def test_ppo_matches_loop_on_random_ragged_batch():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 0, 7, 1, 4]
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).masked_fill(~mask, -math.inf)
    old_logprobs = (logprobs + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).masked_fill(~mask, NAN)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    eps, eps_high, dual = 0.2, 0.3, 3.0
    per_row = []
    for i, n in enumerate(lengths):
        row = []
        for t in range(n):
            r = math.exp(logprobs[i, t].item() - old_logprobs[i, t].item())
            a = advantages[i, t].item()
            pg = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps_high))
            row.append(min(pg, -a * dual) if a < 0 else pg)
        per_row.append(row)
    flat = [x for row in per_row for x in row]
    for agg, expected in [
        ("token_mean", sum(flat) / len(flat)),
        ("seq_mean", sum(sum(r) / len(r) for r in per_row if r) / sum(1 for r in per_row if r)),
    ]:
        loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, eps, dual, eps_high, loss_agg=agg)
        assert loss.item() == pytest.approx(expected), agg
    with pytest.raises(ValueError, match="loss_agg"):
        ppo_policy_loss(logprobs, old_logprobs, advantages, mask, loss_agg="sum")


def test_ppo_all_empty_batch_gives_zero_loss_with_graph():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and stats["clip_frac"].item() == 0.0
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(2, 3))


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.6, NAN], [2.0, -1.0, NAN]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, NAN], [0.5, 0.5, NAN]])
    returns = torch.tensor([[2.0, 0.0, NAN], [2.0, 0.5, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # unclipped (V - R)^2: 1, 0.36, 0, 2.25 -> 0.5 * 3.61 / 4 = 0.45125
    loss, stats = value_loss(values, old_values, returns, mask)
    assert loss.item() == pytest.approx(0.45125) and stats["clip_frac"].item() == 0.0
    # clipped V (clip 0.2 around 0.5): 0.7, 0.6, 0.7, 0.3 -> (V_clip - R)^2: 1.69, 0.36, 1.69, 0.04
    # max per token: 1.69 (clipped), 0.36 (tie), 1.69 (clipped), 2.25 -> 0.5 * 5.99 / 4 = 0.74875
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.74875)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens: no gradient (the clamp is saturated); others: (V - R) / 4
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.15, 0.0], [0.0, -0.375, 0.0]]))


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, 0.0], [1000.0, 0.0, 0.0, 0.0]]])
    logits.requires_grad_()
    ent = entropy_from_logits(logits)
    # uniform over 4 -> ln 4 ; uniform over 2 live tokens -> ln 2 ; one dominant logit -> 0
    torch.testing.assert_close(ent, torch.tensor([[LN(4), LN(2), 0.0]]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    for b in range(3):
        for t in range(5):
            p = torch.softmax(logits[b, t], -1).tolist()
            assert entropy_from_logits(logits)[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-5)


def test_masked_entropy_ignores_padding():
    logits = torch.zeros(2, 2, 4)
    logits[0, 1] = torch.tensor([50.0, -50.0, 3.0, 7.0])  # padded position, a very different entropy
    logits[1, 0, :2] = -math.inf  # real token, uniform over 2 -> ln 2
    mask = torch.tensor([[1, 0], [1, 0]])
    # real tokens: ln 4 and ln 2
    assert masked_entropy(logits, mask).item() == pytest.approx((LN(4) + LN(2)) / 2)
    assert masked_entropy(logits, torch.zeros(2, 2)).item() == 0.0


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, acc = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + e^-d): d = 1 -> 0.31326, d = -1 -> 1.31326
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2)
    assert acc.item() == 0.5
    loss.backward()
    # d/dc of softplus(-(c - r)) / B = -sigmoid(-(c - r)) / B: raising the chosen score lowers the loss
    s = 1 / (1 + math.exp(1))  # sigmoid(-1)
    torch.testing.assert_close(chosen.grad, torch.tensor([-s / 2, -(1 - s) / 2]))
    torch.testing.assert_close(rejected.grad, -chosen.grad)
    loss, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1.5)) / 2)
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(2)) / 2)
    with pytest.raises(ValueError):
        bradley_terry_loss(chosen, rejected[:1])


def test_dpo_and_ipo_by_hand():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-2.0, -1.5], requires_grad=True)
    rr = torch.tensor([-2.0, -1.5])
    # logits = (pc - pr) - (rc - rr): (2 - 0) = 2, (-1 - 0) = -1 ; beta 0.1
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # -log sigmoid(0.2) = softplus(-0.2) = 0.59814 ; -log sigmoid(-0.1) = softplus(0.1) = 0.74440
    assert loss.item() == pytest.approx((softplus(-0.2) + softplus(0.1)) / 2)
    # implicit rewards beta (pi - ref): chosen 0.1 * 1, 0.1 * -0.5 ; rejected 0.1 * -1, 0.1 * 0.5
    torch.testing.assert_close(chosen_r, torch.tensor([0.1, -0.05]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.1, 0.05]))
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    loss.backward()
    # d/dpc = -beta sigmoid(-beta logits) / B < 0 ; no gradient into the reference
    torch.testing.assert_close(pc.grad, torch.tensor([-0.1 / (1 + math.exp(0.2)) / 2, -0.1 / (1 + math.exp(-0.1)) / 2]))
    assert rc.grad is None
    # label smoothing 0.1: 0.9 softplus(-b l) + 0.1 softplus(b l)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    expected = (0.9 * softplus(-0.2) + 0.1 * softplus(0.2) + 0.9 * softplus(0.1) + 0.1 * softplus(-0.1)) / 2
    assert loss.item() == pytest.approx(expected)
    # IPO: (logits - 1/(2 * 0.1))^2 = (2 - 5)^2 = 9, (-1 - 5)^2 = 36 -> 22.5
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(22.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge2")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_truncated_is_weights_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [0.0, NAN, NAN], [NAN, NAN, NAN]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -math.inf, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    w = truncated_is_weights(logprobs, rollout, mask, cap=2.0)
    # exp(0.5) = 1.6487, exp(-1) = 0.3679, exp(0) = 1, exp(2) = 7.39 -> capped at 2 ; padding 0
    torch.testing.assert_close(
        w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(logprobs, rollout, mask, cap=0.0)
