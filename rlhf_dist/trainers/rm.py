"""Reward-model training: a scalar head on the (SFT) model learns to score chosen above rejected (Bradley-Terry)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow as pa

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data.datasets import DataError, load_table, write_parquet
from rlhf_dist.data.labels import human_preferences, label_folder
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.trackers import open_log
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


def with_preference_sources(cfg: RunConfig, stage: str) -> RunConfig:
    """`label.sources`: simulated alone is `<stage>.data` as it is; with human (the decided judgements of
    `rlhf-dist label` in label.output) the sources are merged into `<output_dir>/<stage>.preferences.parquet`
    (prompt, chosen, rejected, source), and the returned config's `<stage>.data` reads that file."""
    sources = cfg.label.sources
    if "human" not in sources:
        return cfg
    parts = []
    if "simulated" in sources:
        spec = offline.dataset_spec(cfg, stage, "preferences", preferences_path(cfg, stage))
        try:
            parts.append(("simulated", load_table(spec)))
        except (DataError, ValueError) as err:
            raise ConfigError(f"{stage}.data.path", str(err)) from None
    folder = label_folder(cfg)
    human = human_preferences(folder)
    if human.num_rows == 0:
        raise ConfigError(
            "label.sources",
            f"human is listed but {str(folder)!r} holds no decided judgements; label pairs with `rlhf-dist label` "
            f"or drop human from label.sources",
        )
    parts.append(("human", human))
    table = pa.concat_tables(
        [
            t.select(["prompt", "chosen", "rejected"]).append_column("source", pa.array([name] * len(t)))
            for name, t in parts
        ]
    )
    out = Path(cfg.output_dir) / f"{stage}.preferences.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table.to_batches(), out, schema=table.schema)
    counts = ", ".join(f"{len(t)} {name}" for name, t in parts)
    print(f"{stage}: preference pairs from label.sources: {counts}; merged into {out}", flush=True)
    section = getattr(cfg, stage)
    data = dataclasses.replace(section.data, path=str(out), columns={}, split=None)
    return dataclasses.replace(cfg, **{stage: dataclasses.replace(section, data=data)})


@run_dir.claimed("rm")
def run(cfg: RunConfig) -> dict:
    """Trains a reward model from rm.init (else model.policy) on rm.data (and label.sources); saves it to rm.output."""
    cfg = with_preference_sources(cfg, "rm")
    t0, stage = time.perf_counter(), cfg.rm
    data = offline.load_stage_data(cfg, "rm", "preferences", preferences_path(cfg, "rm"))
    out = offline.stage_output(cfg, "rm")
    with open_log(cfg, "rm", Path(cfg.output_dir) / "rm.metrics.jsonl") as log:
        with ray_session(cfg, min_cpus=stage.learners.num_actors * stage.learners.num_cpus):
            rows = offline.fit_and_save(cfg, "rm", RMLearner, data, out, log)
    summary = offline.stage_summary("rm", rows, data, out, log, t0)
    acc = summary["eval_last"].get("accuracy", float("nan"))
    print(f"rm: held-out accuracy {acc:.3f}; model saved to {out} ({summary['seconds']:.1f} s)", flush=True)
    return summary
