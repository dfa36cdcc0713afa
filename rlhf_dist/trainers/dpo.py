"""DPO: the policy learns from preference pairs directly, against a frozen reference; no reward model, no sampling.

1. the reference actors score every answer once: log pi_ref(chosen | prompt), log pi_ref(rejected | prompt);
2. the learners minimise the DPO (or IPO) loss on those pairs for a few epochs, evaluated on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist import run_dir
from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import to_padded
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.orchestration.learner_groups import worker_group
from rlhf_dist.trackers import open_log
from rlhf_dist.trainers import offline
from rlhf_dist.trainers.rm import preferences_path, with_preference_sources
from rlhf_dist.workers.dataset_learner import stack_pairs
from rlhf_dist.workers.dpo_learner import REF_CHOSEN, REF_REJECTED, DPOLearner
from rlhf_dist.workers.reference import ReferenceWorker


def add_reference_logps(pairs: pa.RecordBatch, reference_logprobs: pa.RecordBatch) -> pa.RecordBatch:
    """Adds `ref_chosen_logps`, `ref_rejected_logps` (float32, summed over each answer's tokens) to `pairs`, from
    the reference's per-token `ref_logprobs` of `stack_pairs(pairs)` (chosen rows first)."""
    per_token, mask = to_padded(reference_logprobs, S.REF_LOGPROBS, dtype=torch.float32)
    summed = (per_token * mask).sum(dim=1).numpy().astype(np.float32)
    n = len(pairs)
    pairs = pairs.append_column(pa.field(REF_CHOSEN, pa.float32()), pa.array(summed[:n]))
    return pairs.append_column(pa.field(REF_REJECTED, pa.float32()), pa.array(summed[n:]))


def reference_config(cfg: RunConfig) -> RunConfig:
    """The reference actors' view: the frozen model, scored at temperature 1 (DPO's log-probs are the model's own)."""
    ref = cfg.dpo.reference or cfg.model.reference or cfg.model.policy
    cfg = offline.with_model(cfg, reference=ref)
    return dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, temperature=1.0))


@run_dir.claimed("dpo")
def run(cfg: RunConfig) -> dict:
    """DPO of model.policy on dpo.data (and label.sources) against dpo.reference; saves the policy to dpo.output."""
    cfg = with_preference_sources(cfg, "dpo")
    t0, stage = time.perf_counter(), cfg.dpo
    data = offline.load_stage_data(cfg, "dpo", "preferences", preferences_path(cfg, "dpo"))
    out = offline.stage_output(cfg, "dpo")
    need = max(
        stage.learners.num_actors * stage.learners.num_cpus,
        cfg.roles.reference.num_actors * cfg.roles.reference.num_cpus,
    )
    with open_log(cfg, "dpo", Path(cfg.output_dir) / "dpo.metrics.jsonl") as log, ray_session(cfg, min_cpus=need):
        with worker_group("reference", ReferenceWorker, reference_config(cfg), cfg.roles.reference) as reference:
            # Scored once, before any learner starts: the reference and the pairs never change.
            def score(pairs):
                return add_reference_logps(pairs, reference.scatter("logprobs", stack_pairs(pairs)).batch())

            data.train = score(data.train)
            if data.held is not None:
                data.held = score(data.held)
        rows = offline.fit_and_save(cfg, "dpo", DPOLearner, data, out, log)
    summary = offline.stage_summary("dpo", rows, data, out, log, t0)
    print(
        f"dpo: held-out margin {summary['eval_first'].get('margin', float('nan')):.3f} -> "
        f"{summary['eval_last'].get('margin', float('nan')):.3f}; policy saved to {out}",
        flush=True,
    )
    return summary
