"""Reward-model training: a scalar head on the (SFT) model learns to score chosen above rejected (Bradley-Terry)."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.metrics import MetricsLog
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.trainers import offline
from rlhf_dist.trainers.collect import output_path
from rlhf_dist.workers.rm_learner import RMLearner


def preferences_path(cfg: RunConfig, stage: str) -> Path:
    """`<stage>.data.path`, else the file `rlhf-dist collect` writes (collect.output)."""
    path = Path(getattr(cfg, stage).data.path or output_path(cfg))
    if not path.exists():
        raise ConfigError(
            f"{stage}.data.path",
            f"{str(path)!r} does not exist; point it at preference pairs "
            f"(prompt, chosen, rejected) or run `rlhf-dist collect` first",
        )
    return path


@run_dir.claimed("rm")
def run(cfg: RunConfig) -> dict:
    """Trains a reward model from rm.init (else model.policy) on rm.data; saves it to rm.output."""
    t0, stage = time.perf_counter(), cfg.rm
    data = offline.load_stage_data(cfg, "rm", "preferences", preferences_path(cfg, "rm"))
    out = offline.stage_output(cfg, "rm")
    log = MetricsLog(Path(cfg.output_dir) / "rm.metrics.jsonl")
    with ray_session(cfg, min_cpus=stage.learners.num_actors * stage.learners.num_cpus):
        rows = offline.fit_and_save(cfg, "rm", RMLearner, data, out, log)
    summary = offline.stage_summary("rm", rows, data, out, log, t0)
    acc = summary["eval_last"].get("accuracy", float("nan"))
    print(f"rm: held-out accuracy {acc:.3f}; model saved to {out} ({summary['seconds']:.1f} s)", flush=True)
    return summary
