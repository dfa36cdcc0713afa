"""Preference collection: the policy answers every prompt twice, labellers say which answer is better.

Prompts go in chunks: while the labeller actors judge chunk k, the rollout actors already sample chunk k + 1, so
both groups stay busy and collection scales with either. Pairs whose two answers are the same text, or where one is
empty, carry no preference and are dropped (counted in the summary). The result is one Parquet file, written
atomically: prompt, chosen, rejected (what `rlhf-dist rm` / `dpo` read) and how each label came about.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig, resolve_function
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_batches, repeat_interleave
from rlhf_dist.data.datasets import write_parquet
from rlhf_dist.data.prompts import read_prompt_texts, tokenize_prompts
from rlhf_dist.data.synthetic import gold_reward
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.orchestration.learner_groups import worker_group
from rlhf_dist.trainers.offline import with_model
from rlhf_dist.workers.labeller import LABEL_SCHEMA, PAIR_SCHEMA, LabellerWorker
from rlhf_dist.workers.rollout import RolloutWorker


def output_path(cfg: RunConfig) -> Path:
    return Path(cfg.collect.output or Path(cfg.output_dir) / "preferences.parquet")


def prepare(cfg: RunConfig) -> pa.Table:
    """The tokenised prompts; the judge's function imports and its model exists, all before any actor starts."""
    c = cfg.collect
    for key, ref in (
        ("collect.utility", c.utility if c.judge == "simulated" else None),
        ("collect.judge_function", c.judge_function if c.judge == "function" else None),
    ):
        if ref:
            resolve_function(key, ref)
    if c.judge == "reward_model" and not (Path(c.judge_model) / "config.json").exists():
        raise ConfigError(
            "collect.judge_model",
            f"{c.judge_model!r} is not a saved model; train one with `rlhf-dist rm` or fix the path",
        )
    policy = policy_path(cfg)
    if not (Path(policy) / "config.json").exists():
        raise ConfigError("collect.policy", f"{policy!r} is not a saved model; fix the path or run `rlhf-dist sft`")
    texts = read_prompt_texts(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_prompts=c.num_prompts)))
    tokenizer = load_tokenizer(cfg.model.tokenizer or policy)
    return tokenize_prompts(texts[: c.num_prompts], tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)


def policy_path(cfg: RunConfig) -> str:
    return cfg.collect.policy or cfg.model.policy


def pair_up(samples: pa.RecordBatch, first_id: int) -> pa.RecordBatch:
    """Rows 2i and 2i+1 (two answers to prompt i) -> one PAIR_SCHEMA row, pair_id = first_id + i; pairs with an
    empty answer or two equal answers are left out."""
    text = [t.strip() for t in samples.column(S.RESPONSE_TEXT).to_pylist()]
    keep = np.array(
        [i for i in range(len(text) // 2) if text[2 * i] and text[2 * i + 1] and text[2 * i] != text[2 * i + 1]],
        np.int64,
    )
    first = pa.array(2 * keep)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(first_id + keep),
            samples.column(S.PROMPT_TEXT).take(first),
            samples.column(S.PROMPT_IDS).take(first),
            pa.array([text[i] for i in 2 * keep], pa.string()),
            pa.array([text[i] for i in 2 * keep + 1], pa.string()),
        ],
        schema=PAIR_SCHEMA,
    )


@run_dir.claimed("collect")
def run(cfg: RunConfig) -> dict:
    """Samples two answers per prompt from collect.policy, labels them, writes collect.output (Parquet)."""
    t0, c = time.perf_counter(), cfg.collect
    prompts = prepare(cfg)
    need = sum(r.num_actors * r.num_cpus for r in (cfg.roles.rollout, c.labellers))
    labelled, prompts_done = [], 0
    with ray_session(cfg, min_cpus=need):
        with (
            worker_group(
                "rollout", RolloutWorker, with_model(cfg, policy=policy_path(cfg)), cfg.roles.rollout
            ) as rollout,
            worker_group("labeller", LabellerWorker, cfg, c.labellers) as labellers,
        ):
            for k, start in enumerate(range(0, prompts.num_rows, c.chunk_prompts)):
                chunk = repeat_interleave(concat_batches([prompts.slice(start, c.chunk_prompts)]), 2)
                pairs = pair_up(rollout.scatter("generate", chunk, k).batch(), first_id=start)
                prompts_done += len(chunk) // 2
                if len(pairs) >= len(labellers):  # judged while the next chunk is sampled
                    labelled.append(labellers.scatter("label", pairs))
                elif len(pairs):
                    labelled.append(labellers.call_rank(0, "label", pairs))
            table = pa.Table.from_batches([p.batch() for p in labelled], schema=LABEL_SCHEMA)
    out = output_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = write_parquet(table.to_batches(), out, schema=LABEL_SCHEMA)
    summary = {
        "stage": "collect",
        "path": str(out),
        "pairs": rows,
        "prompts": prompts_done,
        "dropped_pairs": prompts_done - rows,
        "judge": c.judge,
        **label_stats(table, cfg),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"collect: {rows} labelled pairs from {prompts_done} prompts ({summary['dropped_pairs']} without a "
        f"preference dropped), agreement with the judge's scores {summary['score_agreement']:.3f}; "
        f"written to {out}",
        flush=True,
    )
    return summary


def label_stats(table: pa.Table, cfg: RunConfig) -> dict[str, float]:
    """How the labels relate to what the judge saw, and (synthetic task) to the gold score."""
    sc = table.column("score_chosen").to_numpy()
    sr = table.column("score_rejected").to_numpy()
    decided = sc != sr
    stats = {
        "score_agreement": float(np.mean(sc[decided] > sr[decided])) if decided.any() else float("nan"),
        "flip_share": float(np.mean(table.column("flipped").to_numpy(zero_copy_only=False)))
        if len(table)
        else float("nan"),
    }
    if cfg.data.task == "synthetic" and len(table):
        p, ch, rj = (table.column(n).to_pylist() for n in ("prompt", "chosen", "rejected"))
        gc = np.array([gold_reward(a, b) for a, b in zip(p, ch)])
        gr = np.array([gold_reward(a, b) for a, b in zip(p, rj)])
        stats["gold_agreement"] = float(np.mean(gc[gc != gr] > gr[gc != gr])) if (gc != gr).any() else float("nan")
    return stats
