"""Masked reductions: hand-worked numbers, a per-row loop reference, and padding that holds garbage."""

import math

import pytest
import torch

from rlhf_dist.algo import (
    as_bool_mask,
    check_right_padded,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_lengths,
)

LENGTHS = [4, 1, 0, 6, 3]  # a short row and an empty row in the middle of the batch


def ragged(lengths=LENGTHS, seed=0, pad_value=float("nan")):
    """Random [B, T] values with `pad_value` at padding, and the right-padded bool mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    return x.masked_fill(~mask, pad_value), mask


def test_sum_and_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # real values: 1, 2 (row 0) and 7 (row 2) -> sum 10, mean 10/3
    assert masked_sum(x, mask).item() == pytest.approx(10.0)
    assert masked_mean(x, mask).item() == pytest.approx(10.0 / 3)
    # per row: (1+2)/2 = 1.5, empty row -> 0 (not NaN), 7/1 = 7
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0, 7.0]))
    # per column: (1+7)/2 = 4, 2/1 = 2, no real -> 0
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([4.0, 2.0, 0.0]))
    torch.testing.assert_close(masked_sum(x, mask, dim=1, keepdim=True), torch.tensor([[3.0], [0.0], [7.0]]))


def test_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; unbiased 5/3, biased 5/4
    assert masked_var(x, mask).item() == pytest.approx(5.0 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)


def test_loop_reference_with_ragged_rows():
    x, mask = ragged()
    real = torch.cat([x[i, :n] for i, n in enumerate(LENGTHS)])
    assert masked_sum(x, mask).item() == pytest.approx(real.sum().item())
    assert masked_mean(x, mask).item() == pytest.approx(real.mean().item())
    assert masked_var(x, mask).item() == pytest.approx(real.var(unbiased=True).item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item())
    row_mean = masked_mean(x, mask, dim=1)
    row_var = masked_var(x, mask, dim=1)
    for i, n in enumerate(LENGTHS):
        row = x[i, :n].tolist()
        exp_mean = sum(row) / n if n else 0.0
        exp_var = sum((v - exp_mean) ** 2 for v in row) / (n - 1) if n > 1 else 0.0
        assert row_mean[i].item() == pytest.approx(exp_mean)
        assert row_var[i].item() == pytest.approx(exp_var)


def test_whiten_matches_loop_and_zeroes_padding():
    x, mask = ragged(seed=1)
    out = masked_whiten(x, mask)
    real = torch.cat([x[i, :n] for i, n in enumerate(LENGTHS)]).tolist()
    mu = sum(real) / len(real)
    var = sum((v - mu) ** 2 for v in real) / (len(real) - 1)
    for i, n in enumerate(LENGTHS):
        for t in range(x.shape[1]):
            expected = (x[i, t].item() - mu) / math.sqrt(var + 1e-8) if t < n else 0.0
            assert out[i, t].item() == pytest.approx(expected, abs=1e-9)
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.where(mask, out + mu, torch.zeros_like(out)))
    # after whitening: mean 0 and unbiased variance 1 over real tokens
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_all_zero_mask_and_single_token_give_zeros_not_nan():
    x = torch.tensor([[float("nan"), float("inf")], [-float("inf"), 3.0]])
    empty = torch.zeros(2, 2)
    assert masked_sum(x, empty).item() == 0.0
    assert masked_mean(x, empty).item() == 0.0
    assert masked_var(x, empty).item() == 0.0
    assert masked_var(x, empty, unbiased=False).item() == 0.0
    assert torch.equal(masked_whiten(x, empty), torch.zeros(2, 2))
    one = torch.tensor([[0, 0], [0, 1]])
    assert masked_var(x, one).item() == 0.0
    assert torch.equal(masked_whiten(x, one), torch.zeros(2, 2))


def test_padding_garbage_does_not_reach_gradients():
    x = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    masked_mean(x, mask).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


def test_float_and_bool_masks_agree():
    x, mask = ragged(seed=2)
    assert masked_mean(x, mask).item() == pytest.approx(masked_mean(x, mask.double()).item())
    assert masked_var(x, mask.long(), dim=1).tolist() == pytest.approx(masked_var(x, mask, dim=1).tolist())


def test_bad_masks_raise():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, torch.ones(2, 2))
    with pytest.raises(ValueError, match="0 and 1"):
        masked_mean(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError):
        as_bool_mask([[1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        check_right_padded(torch.tensor([[True, True], [False, True]]))
    check_right_padded(torch.tensor([[True, False], [False, False]]))


def test_response_lengths():
    _, mask = ragged()
    assert response_lengths(mask).tolist() == LENGTHS
