"""Masked reductions over per-token tensors.

Conventions for the whole `algo` package:
- per-token tensors are `[batch, response_len]` floats;
- `mask` has the same shape, bool or 0/1 (1 = a real response token);
- responses are right-padded: a row's real tokens come first, a row may be empty (all 0).

Padded positions may hold anything (garbage, -inf, NaN): every function here selects with `torch.where` instead of
multiplying by the mask, because `NaN * 0 = NaN` would leak padding into the result and into gradients.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_bool_mask",
    "per_token_mask",
    "check_right_padded",
    "response_lengths",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]


def as_bool_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """Return `mask` as a bool tensor, checking its shape and that it holds only 0/1.

    mask: bool, integer or floating tensor; 1 (True) = a real token.
    shape: the shape `mask` must have, or None for any shape.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} (the shape of the values)")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or real floating, got {mask.dtype}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must hold only 0 and 1 (or be a bool tensor); got other values")
    return mask != 0


def per_token_mask(mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    """Check that `mask` is `[batch, response_len]` and that every named tensor has that shape; return a bool mask.

    The names only serve the error message, e.g. `per_token_mask(mask, logprobs=lp, advantages=adv)`.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D [batch, response_len] tensor, got {shape}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} (the mask's shape)")
    return as_bool_mask(mask)


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise if a row of the bool `[batch, response_len]` mask has a real token after a padded one.

    Functions that find "the last real token" or bootstrap "after the last real token" rely on right padding.
    """
    if mask.shape[-1] > 1 and (mask[..., 1:] & ~mask[..., :-1]).any():
        rows = torch.nonzero((mask[..., 1:] & ~mask[..., :-1]).any(-1)).flatten().tolist()
        raise ValueError(f"mask must be right-padded (real tokens first, then padding); rows {rows[:8]} are not")


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per row: `[batch, response_len]` mask -> `[batch]` int64."""
    return as_bool_mask(mask).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sum of `x` over real positions. x and mask share a shape; dim=None sums everything (0-d result)."""
    m = as_bool_mask(mask, x.shape)
    xz = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xz.sum() if dim is None else xz.sum(dim=dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of `x` over real positions; 0 where there is none (all-zero mask or empty row), never NaN."""
    m = as_bool_mask(mask, x.shape)
    count = m.sum() if dim is None else m.sum(dim=dim, keepdim=keepdim)
    return masked_sum(x, m, dim, keepdim) / count.clamp(min=1).to(x.dtype)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, unbiased: bool = True, keepdim: bool = False
) -> torch.Tensor:
    """Variance of `x` over real positions.

    unbiased=True divides by (n - 1) (Bessel, torch's default), False by n. Fewer real positions than needed
    (n <= 1 unbiased, n == 0 biased) gives 0, never NaN.
    """
    m = as_bool_mask(mask, x.shape)
    mean = masked_mean(x, m, dim, keepdim=True)
    sq_dev = torch.where(m, (x - mean) ** 2, torch.zeros((), dtype=x.dtype, device=x.device))
    count = m.sum() if dim is None else m.sum(dim=dim, keepdim=keepdim)
    denom = (count - 1) if unbiased else count
    ss = sq_dev.sum() if dim is None else sq_dev.sum(dim=dim, keepdim=keepdim)
    return ss / denom.clamp(min=1).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance over ALL real positions of the batch (one mean, one std).

    Uses the unbiased variance (as TRL's `masked_whiten` and torch's `var`). shift_mean=False keeps the original mean
    (only rescales). Padded positions come out as 0. A single real token, or none, gives 0 there, not NaN.
    """
    m = as_bool_mask(mask, x.shape)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=x.dtype, device=x.device))
