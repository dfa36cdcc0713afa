"""The stale-weight alarm: every sample must come from a policy version within the schedule's bound, and where the
rollout engines and the policy learner hold the same version their log-probs of the same tokens must agree.

It compares at one version in two ways. Where the batch was generated from the learners' current weights (sync
mode, iteration 0, a batch regenerated after a resume, a pipelined drain), the engine's log-probs recorded during
generation are compared with the learner's: the whole batch where the old log-prob pass computes them, else a
seeded sample (``alarm_sample``). Where it was not (the pipelined schedules), every rollout engine and the policy
score a sample right after the push, teacher-forced (``pushed_weight_stats``): the weights the next batches will
come from are the ones compared, and no generation waits for it.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import merge_columns, to_padded

CHECK_SHARE = 8  # without the old log-prob pass, the stale-weight alarm checks 1 in CHECK_SHARE samples


def check_fresh_weights(batch: pa.RecordBatch, version: int, max_staleness: int, stats: dict, limit: float) -> None:
    """Stale weights are an error, not a curiosity (TRL #5312): every sample must come from the learners' version or
    at most ``max_staleness`` before it (the schedule's bound), and where the engine ran the learners' current
    weights its log-probs must agree with theirs for the same tokens."""
    versions = set(batch.column(S.POLICY_VERSION).to_pylist())
    if not versions <= set(range(version - max_staleness, version + 1)):
        raise RuntimeError(
            f"samples carry policy versions {sorted(versions)}, expected {version} or at most {max_staleness} "
            f"before it (train.mode): a rollout actor missed a weight sync"
        )
    check_logprob_gap(stats, limit)


def check_logprob_gap(stats: dict, limit: float) -> None:
    mismatch = stats["logprob_mismatch"]
    if stats["logprob_checked_samples"] and not mismatch <= limit:  # NaN too
        raise RuntimeError(
            f"rollout and learner log-probs differ by {mismatch:.4f} per token on average (limit "
            f"sync.max_logprob_mismatch={limit}): the rollout engine is not running the learner's weights"
        )


def alarm_sample(batch: pa.RecordBatch, cfg: RunConfig, iteration: int, ranks: int) -> pa.RecordBatch | None:
    """Every ``sync.check_every`` iterations (from the first), the samples whose learner log-probs the stale-weight
    alarm compares with the engine's where the whole batch's are not computed: a 1/CHECK_SHARE share, a multiple of
    the policy's ``ranks`` (equal shards), drawn from (seed, iteration) so a run is repeatable. None on the others."""
    if not cfg.sync.checks(iteration):
        return None
    k = min(len(batch), ranks * math.ceil(math.ceil(len(batch) / CHECK_SHARE) / ranks))
    rows = np.random.default_rng((cfg.seed, iteration)).choice(len(batch), size=k, replace=False)
    return batch.take(pa.array(np.sort(rows)))


def logprob_mismatch(batch: pa.RecordBatch, version: int) -> tuple[float, int]:
    """Stale-weight guard: right after a sync the engine and the learner must agree on every token's log-prob; only
    samples of the learner's version can be compared. Returns the mean |rollout - learner| per token over them, and
    how many samples that is."""
    rollout, mask = to_padded(batch, S.ROLLOUT_LOGPROBS, dtype=torch.float32)
    learner, _ = to_padded(batch, S.OLD_LOGPROBS, dtype=torch.float32)
    current = torch.from_numpy(batch.column(S.POLICY_VERSION).to_numpy(zero_copy_only=False) == version)
    checked = mask if bool(current.all()) else mask * current[:, None]
    n_checked = int(checked.sum())
    mismatch = float(((rollout - learner).abs() * checked).sum() / n_checked) if n_checked else math.nan
    return mismatch, int(current.sum())


def pushed_weight_stats(engines: list[pa.RecordBatch], learner: pa.RecordBatch, version: int) -> dict[str, float]:
    """After the push of ``version``: each engine's teacher-forced ``rollout_logprobs`` (and the version it holds)
    of one sample against the policy's ``old_logprobs`` of it. The worst engine's gap (NaN if any engine holds
    another version) and the sample's size, as ``batch_stats`` reports them."""
    gaps = [logprob_mismatch(merge_columns(engine, learner), version) for engine in engines]
    worst = math.nan if any(n < len(learner) for _, n in gaps) else max(gap for gap, _ in gaps)
    return {"logprob_mismatch": worst, "logprob_checked_samples": len(learner)}
