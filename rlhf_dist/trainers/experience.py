"""From a scored batch to advantages and returns: the algorithm's math applied at the driver's tensor edge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.algo import (
    NonFiniteError,
    first_and_count,
    gae_advantages_and_returns,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    nonfinite_rows,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards_from_scores,
    whole_groups,
    zero_rows,
)
from rlhf_dist.config.schema import GROUP_BASELINE
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import add_column, from_padded, to_padded


def compute_advantages(
    batch: pa.RecordBatch, algo, kl_coef: float, on_nonfinite: str = "stop", iteration: int | None = None
) -> tuple[pa.RecordBatch, dict[str, float]]:
    """Adds ``advantages`` (and ``returns`` for GAE) to a batch that has rewards, log-probs and (GAE) values.

    The KL leash: with ``algo.kl_mode == "reward"`` every token's reward is ``-kl_coef * kl``, and the sequence score
    lands on the last token; with ``"loss"`` the policy loss carries the KL instead and rewards are the score alone.
    ``kl`` is KL(old || ref) per token, old being the learner's ``old_logprobs``; a batch without them (not recomputed:
    ``train.recompute_old_logprobs``: sync mode, or the KL in the loss) uses the rollout engine's, of the same weights
    in sync mode: they differ only by the engines' numerics, which the driver's stale-weight alarm bounds
    (``sync.max_logprob_mismatch``).

    A NaN or inf in an input or in the advantages raises NonFiniteError naming it (``on_nonfinite="stop"``), or
    (``"skip"``) the sample is left out of every batch statistic (baselines, whitening, KL) and gets NaN advantages
    and returns, which the learners read as "not trained on"; ``nonfinite/skipped_samples`` counts them.
    """
    lengths = batch.column(S.RESPONSE_IDS).value_lengths().to_numpy(zero_copy_only=False).copy()
    old = S.OLD_LOGPROBS if S.OLD_LOGPROBS in batch.schema.names else S.ROLLOUT_LOGPROBS
    logprobs, mask = to_padded(batch, old, dtype=torch.float32)
    inputs = {
        S.REWARD: torch.from_numpy(batch.column(S.REWARD).to_numpy(zero_copy_only=False).astype(np.float32)),
        old: logprobs,
        S.REF_LOGPROBS: to_padded(batch, S.REF_LOGPROBS, dtype=torch.float32)[0],
    }
    if algo.estimator == "gae":
        inputs[S.VALUES] = to_padded(batch, S.VALUES, dtype=torch.float32)[0]
    if algo.estimator in GROUP_BASELINE:
        inputs[S.GROUP_ID] = torch.from_numpy(batch.column(S.GROUP_ID).to_numpy(zero_copy_only=False).astype(np.int64))
    bad = torch.zeros(len(batch), dtype=torch.bool)
    for name, x in inputs.items():
        if x.is_floating_point():
            rows = nonfinite_rows(x, mask if x.dim() == 2 else None)
            if on_nonfinite == "stop":
                _check(rows, name, x, batch, iteration)
            bad |= rows
    if not bad.any():
        advantages, returns, stats = _advantages(inputs, mask.float(), algo, kl_coef, old)
    else:  # the math runs on the finite samples alone; the others get NaN
        keep = ~bad
        if algo.estimator == "rloo":
            keep = whole_groups(keep, inputs[S.GROUP_ID], min_kept=2)
        index = torch.nonzero(keep).flatten()
        kept = {name: x[index] for name, x in inputs.items()}
        kept_adv, kept_ret, stats = _advantages(kept, mask[index].float(), algo, kl_coef, old)
        advantages = torch.full(mask.shape, float("nan")).index_copy_(0, index, kept_adv)
        returns = None if kept_ret is None else torch.full(mask.shape, float("nan")).index_copy_(0, index, kept_ret)
        bad = ~keep
    rows = nonfinite_rows(advantages, mask) & ~bad
    if on_nonfinite == "stop":
        _check(rows, S.ADVANTAGES, advantages, batch, iteration)
    elif rows.any():  # finite inputs, yet an overflow: those samples go too
        bad |= rows
        advantages = advantages.masked_fill(rows[:, None], float("nan"))
        returns = None if returns is None else returns.masked_fill(rows[:, None], float("nan"))
        stats["advantages_mean"] = float(masked_mean(zero_rows(advantages, bad), mask & ~bad[:, None]))
    if returns is not None:
        batch = add_column(batch, S.RETURNS, _ragged(returns, lengths))
    if on_nonfinite == "skip":
        stats["nonfinite/skipped_samples"] = int(bad.sum())
    return add_column(batch, S.ADVANTAGES, _ragged(advantages, lengths)), stats


def _advantages(
    x: dict[str, torch.Tensor], mask_f: torch.Tensor, algo, kl_coef: float, old: str
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(advantages, returns or None, stats) of the samples in ``x``, all of them finite; ``old`` names the policy's
    log-probs in it."""
    kl = kl_estimate(x[old], x[S.REF_LOGPROBS], mask_f, algo.kl_estimator)
    penalty = -kl_coef * kl if algo.kl_mode == "reward" else torch.zeros_like(kl)
    scores = x[S.REWARD]
    stats = {"kl": float(masked_mean(kl, mask_f)), "kl_coef": kl_coef}
    returns = None
    if algo.estimator == "gae":
        rewards = token_rewards_from_scores(scores, mask_f, penalty)
        advantages, returns = gae_advantages_and_returns(rewards, x[S.VALUES], mask_f, algo.gamma, algo.lam)
        stats["returns_mean"] = float(masked_mean(returns, mask_f))
    elif algo.estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(token_rewards_from_scores(scores, mask_f, penalty), mask_f, algo.gamma)
    else:
        # Group-relative estimators judge a response against its siblings; a per-token KL penalty has no place in
        # a sequence-level baseline, so it is folded in as a sequence sum.
        seq_scores = scores + (penalty * mask_f).sum(dim=1)
        if algo.estimator == "grpo":
            advantages = grpo_advantages(seq_scores, x[S.GROUP_ID], mask_f)
        else:
            advantages = rloo_advantages(seq_scores, x[S.GROUP_ID], mask_f)
    if algo.normalize_advantages and algo.estimator in ("gae", "rloo"):
        advantages = masked_whiten(advantages, mask_f)
    stats["advantages_mean"] = float(masked_mean(advantages, mask_f))
    return advantages, returns, stats


def _check(rows: torch.Tensor, name: str, x: torch.Tensor, batch: pa.RecordBatch, iteration: int | None) -> None:
    """One line naming the quantity, the iteration, the first bad sample and how many there are."""
    first, count = first_and_count(rows)
    if count:
        sample = batch.column(S.SAMPLE_ID)[first].as_py() if S.SAMPLE_ID in batch.schema.names else first
        value = x[first] if x.dim() == 1 else x[first][~torch.isfinite(x[first])][0]
        when = f"iteration {iteration}" if iteration is not None else "this iteration"
        raise NonFiniteError(
            f"{name} is {float(value)} for sample {sample} (row {first}) in {when}, {count} of {len(rows)} samples "
            f"non-finite (driver, computing advantages); find where it comes from, or set train.on_nonfinite=skip "
            "to train without such samples"
        )


def _ragged(x: torch.Tensor, lengths: np.ndarray) -> pa.Array:
    return from_padded(x.float(), torch.from_numpy(lengths))
