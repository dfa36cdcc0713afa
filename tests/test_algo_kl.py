"""KL estimators (sign convention pinned by exact expectations), KL-penalised rewards, KL controllers."""

import math

import pytest
import torch

from rlhf_dist.algo import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
)

NAN = float("nan")


def test_estimators_by_hand():
    # token 0: pi = 0.5, ref = 0.25 -> log r = ln(0.25/0.5) = -ln 2
    # token 1: pi = 0.2, ref = 0.4  -> log r = +ln 2
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2), NAN]])
    ref_logprobs = torch.tensor([[math.log(0.25), math.log(0.4), -math.inf]])
    mask = torch.tensor([[1, 1, 0]])
    ln2 = math.log(2)
    k1 = kl_estimate(logprobs, ref_logprobs, mask, "k1")
    k2 = kl_estimate(logprobs, ref_logprobs, mask, "k2")
    k3 = kl_estimate(logprobs, ref_logprobs, mask, "k3")
    # k1 = -log r = logprobs - ref_logprobs
    torch.testing.assert_close(k1, torch.tensor([[ln2, -ln2, 0.0]]))
    # k2 = 0.5 (log r)^2 = 0.5 ln(2)^2 for both
    torch.testing.assert_close(k2, torch.tensor([[0.5 * ln2**2, 0.5 * ln2**2, 0.0]]))
    # k3 = (r - 1) - log r: (0.5 - 1) + ln 2 = 0.19315, (2 - 1) - ln 2 = 0.30685
    torch.testing.assert_close(k3, torch.tensor([[ln2 - 0.5, 1.0 - ln2, 0.0]]))


def test_k1_and_k3_expectations_equal_kl_pi_to_ref():
    # Exact expectation over x ~ pi of a 3-token vocabulary: one row holds every token once, weighted by pi.
    pi = [0.7, 0.2, 0.1]
    ref = [0.2, 0.3, 0.5]
    logprobs = torch.tensor([[math.log(p) for p in pi]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[math.log(q) for q in ref]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    kl_pi_ref = sum(p * math.log(p / q) for p, q in zip(pi, ref))  # 0.6349
    kl_ref_pi = sum(q * math.log(q / p) for p, q in zip(pi, ref))  # 0.6758, the wrong direction
    assert abs(kl_pi_ref - kl_ref_pi) > 0.03
    weights = torch.tensor([pi], dtype=torch.float64)
    for estimator in ("k1", "k3"):
        expectation = (kl_estimate(logprobs, ref_logprobs, mask, estimator) * weights).sum().item()
        assert expectation == pytest.approx(kl_pi_ref, abs=1e-12), estimator
    k3 = kl_estimate(logprobs, ref_logprobs, mask, "k3")
    assert (k3 >= 0).all()


def test_padding_is_zero_and_gradients_stay_finite():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 0, 4]
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    logprobs = (-torch.rand(4, 4, generator=g)).masked_fill(~mask, -math.inf).requires_grad_()
    ref_logprobs = (-torch.rand(4, 4, generator=g)).masked_fill(~mask, -math.inf)
    for estimator in ("k1", "k2", "k3"):
        kl = kl_estimate(logprobs, ref_logprobs, mask, estimator)
        assert torch.equal(kl[~mask], torch.zeros(int((~mask).sum())))
        (grad,) = torch.autograd.grad(kl.sum(), logprobs)
        assert torch.isfinite(grad).all() and torch.equal(grad[~mask], torch.zeros(int((~mask).sum())))
    # d k1 / d logprobs = +1 on real tokens
    (grad,) = torch.autograd.grad(kl_estimate(logprobs, ref_logprobs, mask, "k1").sum(), logprobs)
    assert torch.equal(grad, mask.float())


def test_estimator_name_checked():
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k4")


def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([2.0, 5.0, 1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, NAN, NAN], [NAN, NAN, NAN]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -1.0], [-3.0, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k1")
    # k1 = logprobs - ref: row 0: 0.5, -1.0, 0.0 ; row 1: 2.0 ; row 2 empty
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # reward = -0.1 * kl, plus the score on the last real token
    # row 0: -0.05, +0.1, 0 + 2 = 2.0 ; row 1: -0.2 + 5 = 4.8 ; row 2 nothing
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [4.8, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=-0.1)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.value == 0.05
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    # KL 9 > target: error = 9/6 - 1 = 0.5, clipped to 0.2 -> coef *= 1 + 0.2 * 256/10000 = 1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.2 * 1.00512)
    # KL 6.6: error = 0.1 (not clipped) -> *= 1 + 0.1 * 256/10000 = 1.00256
    assert ctl.update(torch.tensor(6.6), 256) == pytest.approx(0.2 * 1.00512 * 1.00256)
    # KL 0 < target: error = -1 clipped to -0.2 -> *= 1 - 0.2 * 1000/10000 = 0.98
    assert ctl.update(0.0, 1000) == pytest.approx(0.2 * 1.00512 * 1.00256 * 0.98)
    assert ctl.value == pytest.approx(0.2 * 1.00512 * 1.00256 * 0.98)


def test_controllers_reject_bad_settings():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 6.0, 0)
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-1.0)
