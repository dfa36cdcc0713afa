"""NaN and inf in training quantities: which samples hold one, the first of them, how many.

Shapes: per-sample `[batch]`, per-token `[batch, response_len]` with `mask` 1 = a real response token; padding is never
read (it may hold anything). A sample is bad when any of its real values is NaN or +-inf.
"""

from __future__ import annotations

import torch

from rlhf_dist.algo.masked import as_bool_mask

__all__ = ["NonFiniteError", "first_and_count", "nonfinite_rows", "whole_groups", "zero_rows"]


class NonFiniteError(ValueError):
    """A NaN or inf in a reward, advantage, loss or gradient; the message names it, where, and the first bad sample."""


def nonfinite_rows(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[batch]` bool, True where row i of `x` holds a NaN or inf.

    x: `[batch]` (one value per sample) or `[batch, response_len]`; mask: `[batch, response_len]`, only for a 2-D `x`
    (None = every position counts).
    """
    bad = ~torch.isfinite(x)
    if x.dim() == 1:
        if mask is not None:
            raise ValueError(f"a per-sample x [batch] takes no mask, got mask of shape {tuple(mask.shape)}")
        return bad
    if x.dim() != 2:
        raise ValueError(f"x must be [batch] or [batch, response_len], got shape {tuple(x.shape)}")
    if mask is not None:
        bad = bad & as_bool_mask(mask, x.shape)
    return bad.any(dim=1)


def first_and_count(rows: torch.Tensor) -> tuple[int, int]:
    """(index of the first True in the `[batch]` bool `rows`, how many are True); (-1, 0) when none is."""
    index = torch.nonzero(rows.reshape(-1)).flatten()
    return (int(index[0]), int(index.numel())) if index.numel() else (-1, 0)


def zero_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x` (`[batch]` or `[batch, ...]`) with the rows where `rows` (`[batch]` bool) is True set to 0.

    Masking alone is not enough: NaN * 0 is NaN, so a masked sum over a NaN row is NaN.
    """
    keep = ~rows.reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def whole_groups(keep: torch.Tensor, group_ids: torch.Tensor, min_kept: int) -> torch.Tensor:
    """`keep` (`[batch]` bool) with every sample of a group dropped where fewer than `min_kept` of it are kept.

    group_ids: `[batch]` integer, samples of one prompt share an id. A group-relative baseline needs siblings: RLOO's
    leave-one-out mean needs min_kept=2.
    """
    if not keep.numel():
        return keep
    _, inverse = torch.unique(group_ids, return_inverse=True)
    kept_per_group = torch.bincount(inverse, weights=keep.to(torch.float64), minlength=int(inverse.max()) + 1)
    return keep & (kept_per_group[inverse] >= min_kept)
