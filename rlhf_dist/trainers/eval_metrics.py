"""What `rlhf-dist eval` (evaluate.py) and the pipeline's comparison (compare.py) measure on a policy's samples: pure
functions of the samples, their scores and the reference's log-probs, and the table they print."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.algo.kl import kl_estimate
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import to_padded


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts' whitespace-separated words (Li et al. 2016, "distinct-n"),
    pooled over the texts; NaN when no text has n words."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Mean over pairs of 1 where ``scores[i] > baseline_scores[i]``, 1/2 on a tie, 0 below; pairs where either is
    NaN are left out (NaN when none is left)."""
    a, b = np.asarray(scores, np.float64), np.asarray(baseline_scores, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores {a.shape} and baseline_scores {b.shape} must be 1-D of one length (paired samples)")
    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        return math.nan
    return float(np.mean((a[ok] > b[ok]) + 0.5 * (a[ok] == b[ok])))


def sample_metrics(
    sampled: pa.RecordBatch, scores: pa.RecordBatch, ref: pa.RecordBatch, kl_estimator: str = "k1"
) -> dict[str, float]:
    """Every metric but the win rate, from a policy's samples (response_ids, rollout_logprobs, response_text), the
    reward role's scores of them and the reference role's log-probs of the same tokens."""
    own, mask = to_padded(sampled, S.ROLLOUT_LOGPROBS, dtype=torch.float32)
    ref_lp, _ = to_padded(ref, S.REF_LOGPROBS, dtype=torch.float32)
    tokens = float(mask.sum())
    texts = sampled.column(S.RESPONSE_TEXT).to_pylist()
    return {
        "reward": nanmean(scores.column(S.REWARD)),
        "gold": nanmean(scores.column(S.GOLD_REWARD)),
        "kl_to_ref": float(kl_estimate(own, ref_lp, mask, kl_estimator).sum()) / max(1.0, tokens),
        "response_len": tokens / max(1, len(sampled)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def nanmean(column: pa.Array) -> float:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return float(np.nanmean(values)) if len(values) and not np.all(np.isnan(values)) else math.nan


def format_table(results: dict[str, dict[str, float]], columns: Sequence[tuple[str, str]]) -> str:
    """One row per policy, one column per metric (NaN: not measured)."""
    widths = [max(8, len(title) + 2) for _, title in columns]
    first = max(8, *(len(name) + 2 for name in results))
    header = f"{'policy':<{first}}" + "".join(f"{title:>{w}}" for (_, title), w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        cells = ("-" if math.isnan(m.get(key, math.nan)) else f"{m[key]:.3f}" for key, _ in columns)
        lines.append(f"{name:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)
