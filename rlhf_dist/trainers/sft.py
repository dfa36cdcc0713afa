"""Supervised fine-tuning: the base model learns to continue prompts the way the demonstrations do."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data.datasets import write_parquet
from rlhf_dist.data.synthetic import POSITIVE_WORDS, corpus
from rlhf_dist.models.tiny import ensure_tiny_model
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.trackers import open_log
from rlhf_dist.trainers import offline
from rlhf_dist.workers.sft_learner import SFTLearner


def synthetic_demonstrations(n: int, seed: int) -> dict[str, list[str]]:
    """`n` (prompt, response) rows cut from `synthetic.corpus` lines: the prompt is the neutral words before the
    first positive word, the response the rest (a line without a positive word teaches nothing and is skipped)."""
    positive, rows = set(POSITIVE_WORDS), {"prompt": [], "response": []}
    for line in corpus(n, seed):
        words = line.split()
        cut = next((i for i, w in enumerate(words) if w in positive), None)
        if cut:
            rows["prompt"].append(" ".join(words[:cut]))
            rows["response"].append(" ".join(words[cut:]))
    return rows


def demonstrations_path(cfg: RunConfig) -> Path:
    """sft.data.path, or the synthetic demonstrations written (atomically) into the run dir."""
    if cfg.sft.data.path:
        return Path(cfg.sft.data.path)
    if cfg.data.task != "synthetic":
        raise ConfigError(
            "sft.data.path",
            "not set, and synthetic demonstrations exist only for data.task="
            "synthetic; set sft.data.path=PATH (prompt/response rows)",
        )

    path = Path(cfg.output_dir) / "sft_demonstrations.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet([pa.record_batch(synthetic_demonstrations(cfg.sft.demonstrations, cfg.seed))], path)
    return path


@run_dir.claimed("sft")
def run(cfg: RunConfig) -> dict:
    """SFT of model.policy on sft.data; saves the model (Hugging Face format) to sft.output."""
    t0, stage = time.perf_counter(), cfg.sft
    ensure_tiny_model(cfg)
    data = offline.load_stage_data(cfg, "sft", "demonstrations", demonstrations_path(cfg))
    out = offline.stage_output(cfg, "sft")
    with open_log(cfg, "sft", Path(cfg.output_dir) / "sft.metrics.jsonl") as log:
        with ray_session(cfg, min_cpus=stage.learners.num_actors * stage.learners.num_cpus):
            rows = offline.fit_and_save(cfg, "sft", SFTLearner, data, out, log)
    summary = offline.stage_summary("sft", rows, data, out, log, t0)
    print(f"sft: model saved to {out} ({summary['steps']} steps, {summary['seconds']:.1f} s)", flush=True)
    return summary
