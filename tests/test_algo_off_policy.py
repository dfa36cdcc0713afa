"""Off-policy correction: hand-worked decoupled PPO with TIS and IcePop weights, a per-token loop reference, exact
equality with plain PPO when behaviour == proximal, zero gradient on masked tokens, and the config keys."""

import math

import pytest
import torch

from rlhf_dist.algo import decoupled_ppo_loss, icepop_weights, ppo_policy_loss
from rlhf_dist.config import ConfigError

NAN = float("nan")
LN = math.log


def test_icepop_weights_by_hand():
    proximal = torch.tensor([[-1.0, -2.0, -0.5], [0.0, NAN, NAN], [NAN, NAN, NAN]])
    behaviour = torch.tensor([[-1.5, -0.5, -3.0], [0.0, -math.inf, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # k = exp(prox - behav): exp(0.5) = 1.65 kept; exp(-1.5) = 0.22 < 0.5 masked; exp(2.5) = 12.2 > 5 masked;
    # exp(0) = 1 kept; padding 0 (also with -inf / NaN there)
    w = icepop_weights(proximal, behaviour, mask, low=0.5, high=5.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert not w.requires_grad
    # the band is closed: ratio exactly 1 at low = 1 is kept
    assert icepop_weights(proximal, behaviour, mask, low=1.0, high=2.0)[1, 0].item() == 1.0
    with pytest.raises(ValueError, match="low=2.0, high=2.0"):
        icepop_weights(proximal, behaviour, mask, low=2.0, high=2.0)
    with pytest.raises(ValueError, match="low=0"):
        icepop_weights(proximal, behaviour, mask, low=0.0, high=2.0)


def decoupled_batch():
    """Tokens a, b (row 0) and c (row 1); ratio = pi_theta / pi_prox, k = pi_prox / pi_behav:
    a: ratio 1.5, A +1, k 3      b: ratio 1.5, A -1, k 0.25      c: ratio 1, A +2, k 1;  padding NaN, one empty row."""
    logprobs = torch.tensor([[LN(1.5), LN(1.5), NAN], [0.0, NAN, NAN], [NAN, NAN, NAN]], requires_grad=True)
    proximal = torch.tensor([[0.0, 0.0, NAN], [0.0, NAN, NAN], [NAN, NAN, NAN]])
    behaviour = torch.tensor([[-LN(3.0), LN(4.0), NAN], [0.0, NAN, NAN], [NAN, NAN, NAN]])
    advantages = torch.tensor([[1.0, -1.0, NAN], [2.0, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    return logprobs, proximal, behaviour, advantages, mask


def test_decoupled_ppo_with_tis_by_hand():
    logprobs, proximal, behaviour, advantages, mask = decoupled_batch()
    loss, stats = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, "tis", tis_cap=2.0)
    # PPO term max(-A r, -A clip(r, 0.8, 1.2)) times w = min(k, 2):
    #   a: max(-1.5, -1.2) = -1.2 (clipped) x 2 = -2.4      b: max(1.5, 1.2) = 1.5 x 0.25 = 0.375
    #   c: -2 x 1 = -2                                       token mean: (-2.4 + 0.375 - 2) / 3 = -4.025 / 3
    assert loss.item() == pytest.approx(-4.025 / 3)
    assert stats["is_clipped_frac"].item() == pytest.approx(1 / 3)  # a: k 3 > cap 2
    assert stats["is_weight_mean"].item() == pytest.approx((2 + 0.25 + 1) / 3)
    # behav_kl = mean of k3 = (k - 1) - ln k: a: 2 - ln 3, b: -0.75 + ln 4, c: 0
    assert stats["behav_kl"].item() == pytest.approx((2 - LN(3) - 0.75 + LN(4)) / 3, rel=1e-5)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3) and "icepop_masked_frac" not in stats
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d/d logprob = w * (-A r) / 3 where unclipped: a clipped -> 0; b: 0.25 * 1.5 / 3 = 0.125; c: 1 * -2 / 3
    expected = torch.tensor([[0.0, 0.125, 0.0], [-2 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_decoupled_ppo_with_icepop_by_hand_masks_the_gradient():
    logprobs, proximal, behaviour, advantages, mask = decoupled_batch()
    proximal.requires_grad_()
    behaviour.requires_grad_()
    loss, stats = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, "icepop", icepop_band=(0.5, 5))
    # w = k inside [0.5, 5], else 0:  a: -1.2 x 3 = -3.6   b: k 0.25 masked -> 0   c: -2
    # token mean (b still counts in it, as in IcePop's 1/|y|): (-3.6 + 0 - 2) / 3
    assert loss.item() == pytest.approx(-5.6 / 3)
    assert stats["icepop_masked_frac"].item() == pytest.approx(1 / 3) and "is_clipped_frac" not in stats
    assert stats["is_weight_mean"].item() == pytest.approx((3 + 0 + 1) / 3)
    loss.backward()
    # b is unclipped (1.5 > 1.2 for A < 0) yet masked: exactly zero gradient; no gradient into prox or behaviour
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [-2 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert logprobs.grad[0, 1].item() == 0.0
    assert proximal.grad is None and behaviour.grad is None


def test_decoupled_ppo_matches_loop_on_random_ragged_batch():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 0, 7, 1, 4]
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).masked_fill(~mask, -math.inf)
    proximal = (logprobs + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).masked_fill(~mask, NAN)
    behaviour = (proximal + 1.0 * torch.randn(B, T, generator=g, dtype=torch.float64)).masked_fill(~mask, NAN)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    eps, eps_high, dual, cap, band = 0.2, 0.3, 3.0, 1.5, (0.5, 2.0)
    for correction in ("tis", "icepop"):
        per_row = []
        for i, n in enumerate(lengths):
            row = []
            for t in range(n):
                r = math.exp(logprobs[i, t].item() - proximal[i, t].item())
                k = math.exp(proximal[i, t].item() - behaviour[i, t].item())
                w = min(k, cap) if correction == "tis" else (k if band[0] <= k <= band[1] else 0.0)
                a = advantages[i, t].item()
                pg = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps_high))
                row.append(w * (min(pg, -a * dual) if a < 0 else pg))
            per_row.append(row)
        flat = [x for row in per_row for x in row]
        for agg, expected in [
            ("token_mean", sum(flat) / len(flat)),
            ("seq_mean", sum(sum(r) / len(r) for r in per_row if r) / sum(1 for r in per_row if r)),
        ]:
            loss, _ = decoupled_ppo_loss(
                logprobs, proximal, behaviour, advantages, mask, correction, cap, band, eps, dual, eps_high, agg
            )
            assert loss.item() == pytest.approx(expected), (correction, agg)


@pytest.mark.parametrize("correction", ["tis", "icepop"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_behaviour_equal_to_proximal_is_exactly_plain_ppo(correction, loss_agg):
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 0, 1])[:, None]
    logprobs = (-torch.rand(4, 6, generator=g) * 3).masked_fill(~mask, NAN).requires_grad_()
    proximal = (logprobs.detach() + 0.5 * torch.randn(4, 6, generator=g)).masked_fill(~mask, NAN)
    advantages = torch.randn(4, 6, generator=g)
    kwargs = dict(clip_eps=0.2, dual_clip=3.0, clip_eps_high=0.28, loss_agg=loss_agg)
    plain, plain_stats = ppo_policy_loss(logprobs, proximal, advantages, mask, **kwargs)
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    loss, stats = decoupled_ppo_loss(logprobs, proximal, proximal.clone(), advantages, mask, correction, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.equal(loss, plain) and torch.equal(grad, plain_grad)
    assert all(torch.equal(stats[k], v) for k, v in plain_stats.items())
    assert stats["is_weight_mean"].item() == 1.0 and stats["behav_kl"].item() == 0.0


def test_decoupled_ppo_bad_input_is_one_line():
    logprobs, proximal, behaviour, advantages, mask = decoupled_batch()
    cases = [
        (dict(correction="clip"), "correction must be one of"),
        (dict(correction="tis", tis_cap=None), "needs tis_cap"),
        (dict(correction="tis", tis_cap=0.0), "cap must be > 0"),
        (dict(correction="icepop", icepop_band=(5.0, 0.5)), "0 < low < high"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"behaviour_logprobs has shape \(3, 2\)"):
        decoupled_ppo_loss(logprobs, proximal, behaviour[:, :2], advantages, mask)


# ---------------------------------------------------------------- config
def test_off_policy_config_defaults_and_the_tis_cap_mapping(tiny_cfg):
    a = tiny_cfg().algo
    assert (a.off_policy, a.tis_cap, a.icepop_low, a.icepop_high) == ("none", None, 0.5, 5.0)
    assert a.off_policy_correction() == "none"
    # tis_cap alone, as configs wrote it before algo.off_policy existed, keeps meaning TIS
    assert tiny_cfg("algo.tis_cap=2").algo.off_policy_correction() == "tis"
    assert tiny_cfg("algo.off_policy=tis", "algo.tis_cap=2").algo.off_policy_correction() == "tis"
    assert tiny_cfg("algo.off_policy=icepop").algo.off_policy_correction() == "icepop"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("algo.off_policy=tis",), "algo.tis_cap: null, but algo.off_policy=tis truncates"),
        (("algo.off_policy=icepop", "algo.tis_cap=2"), "algo.tis_cap: 2.0 is ignored by algo.off_policy=icepop"),
        (("algo.off_policy=icepop", "algo.icepop_low=3"), "algo.icepop_low: 3.0 with algo.icepop_high=5.0"),
        (("algo.off_policy=icepop", "algo.icepop_high=0.9"), "algo.icepop_low: 0.5 with algo.icepop_high=0.9"),
        (("algo.off_policy=icepop", "algo.icepop_low=1", "algo.icepop_high=1"), "must hold ratio 1"),
        (("algo.icepop_low=0",), "algo.icepop_low: 0.0 is out of range; use a value > 0"),
    ],
)
def test_impossible_off_policy_configs_fail_in_one_line(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_cfg(*overrides)
    assert "\n" not in str(err.value)
