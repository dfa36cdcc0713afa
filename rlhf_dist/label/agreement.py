"""How far labellers agree with each other and with the gold scorer: the numbers of `rlhf-dist label --summary`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from rlhf_dist.data.labels import DECIDED
from rlhf_dist.data.synthetic import gold_reward


def cohens_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e), p_o the share of items they agree
    on, p_e = sum_k p_1(k) p_2(k) the agreement expected from their label frequencies alone. NaN for no items, or
    when both always give one and the same label (p_e = 1: agreement by chance is certain, kappa undefined)."""
    if len(first) != len(second):
        raise ValueError(f"cohens_kappa: {len(first)} labels from the first rater, {len(second)} from the second")
    n = len(first)
    if n == 0:
        return float("nan")
    p_o = sum(a == b for a, b in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    p_e = sum(c1[k] * c2[k] for k in c1) / n**2
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


def overlap_verdicts(judgements: pa.Table) -> tuple[list[str], list[str]]:
    """For every pair judged (not skipped) by two or more labellers: the first two verdicts (a / b / tie), in
    order of time."""
    rows = judgements.filter(pc.not_equal(judgements.column("verdict"), "skip"))
    rows = rows.sort_by([("labelled_at", "ascending"), ("labeller_id", "ascending")])
    seen: dict[int, list[str]] = {}
    for pair, verdict in zip(rows.column("pair_id").to_pylist(), rows.column("verdict").to_pylist()):
        seen.setdefault(pair, []).append(verdict)
    both = [v[:2] for v in seen.values() if len(v) >= 2]
    return [v[0] for v in both], [v[1] for v in both]


def summarize(judgements: pa.Table, total_pairs: int | None = None, synthetic: bool = False) -> dict:
    """Pairs labelled, per-labeller counts, Cohen's kappa on the overlap and (synthetic task) agreement with gold."""
    verdicts = judgements.column("verdict").to_pylist()
    labellers = judgements.column("labeller_id").to_pylist()
    pairs = judgements.column("pair_id").to_pylist()
    first, second = overlap_verdicts(judgements)
    out = {
        "pairs_labelled": len({p for p, v in zip(pairs, verdicts) if v != "skip"}),
        "total_pairs": total_pairs,
        "judgements": sum(v != "skip" for v in verdicts),
        "decided": sum(v in DECIDED for v in verdicts),
        "ties": verdicts.count("tie"),
        "skips": verdicts.count("skip"),
        "per_labeller": dict(sorted(Counter(lab for lab, v in zip(labellers, verdicts) if v != "skip").items())),
        "overlap_pairs": len(first),
        "overlap_agreement": sum(a == b for a, b in zip(first, second)) / len(first) if first else None,
        "kappa": _number(cohens_kappa(first, second)),
    }
    if synthetic:
        out["gold_agreement"] = _number(gold_agreement(judgements))
    return out


def _number(x: float) -> float | None:
    """JSON has no NaN: an undefined statistic is null."""
    return None if math.isnan(x) else x


def gold_agreement(judgements: pa.Table) -> float:
    """Share of decided judgements whose chosen answer the synthetic task's gold scorer ranks higher (pairs the gold
    scorer ties are left out); NaN when there are none."""
    hits = []
    for p, c, r, v in zip(*(judgements.column(k).to_pylist() for k in ("prompt", "chosen", "rejected", "verdict"))):
        gc, gr = gold_reward(p, c), gold_reward(p, r)
        if v in DECIDED and gc != gr:
            hits.append(gc > gr)
    return sum(hits) / len(hits) if hits else float("nan")


def format_summary(s: dict) -> str:
    """The summary as a few lines for the terminal."""
    fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    of = f" of {s['total_pairs']}" if s.get("total_pairs") is not None else ""
    per = ", ".join(f"{k} {v}" for k, v in s["per_labeller"].items()) or "none"
    lines = [
        f"pairs labelled: {s['pairs_labelled']}{of} ({s['judgements']} judgements: {s['decided']} decided, "
        f"{s['ties']} ties; {s['skips']} skips)",
        f"per labeller: {per}",
        f"overlap: {s['overlap_pairs']} pairs judged twice, raw agreement {fmt(s['overlap_agreement'])}, "
        f"Cohen's kappa {fmt(s['kappa'])}",
    ]
    if "gold_agreement" in s:
        lines.append(f"agreement with the gold scorer (decided pairs): {fmt(s['gold_agreement'])}")
    return "\n".join(lines)
