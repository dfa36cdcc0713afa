"""Reward-model training: a scalar head on the (SFT) model learns to score chosen above rejected (Bradley-Terry)."""
from __future__ import annotations

import time
from pathlib import Path

from rlhf_dist.config import ConfigError
from rlhf_dist.metrics import MetricsLog
from rlhf_dist.trainers import offline


def preferences_path(cfg, stage: str) -> Path:
    """`<stage>.data.path`, else the file `rlhf-dist collect` writes (collect.output)."""
    from rlhf_dist.trainers.collect import output_path

    path = Path(getattr(cfg, stage).data.path or output_path(cfg))
    if not path.exists():
        raise ConfigError(f"{stage}.data.path", f"{str(path)!r} does not exist; point it at preference pairs "
                                                f"(prompt, chosen, rejected) or run `rlhf-dist collect` first")
    return path


def run(cfg) -> dict:
    """Trains a reward model from rm.init (else model.policy) on rm.data; saves it to rm.output."""
    from rlhf_dist.distributed.cluster import ray_session
    from rlhf_dist.distributed.learners import learner_group
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.workers.rm import RMLearner

    t0, stage = time.perf_counter(), cfg.rm
    spec = offline.dataset_spec(cfg, "rm", "preferences", preferences_path(cfg, "rm"))
    data, report = offline.read_tokenized(spec, load_tokenizer(cfg.model.tokenizer or cfg.model.policy),
                                         "rm.data.path")
    train, held = offline.split_held_out(data, stage, cfg.seed, "rm")
    out = offline.stage_output(cfg, "rm")
    log = MetricsLog(Path(cfg.output_dir) / "rm.metrics.jsonl")
    with ray_session(cfg, min_cpus=stage.learners.num_actors * stage.learners.num_cpus):
        with learner_group("rm", RMLearner, cfg, stage.learners) as learners:
            rows = offline.train_epochs(learners, RMLearner, train, held, stage, cfg.seed, "rm", log)
            learners.call("save_hf", str(out)).get()
    summary = offline.summarize("rm", rows, model_path=str(out), metrics_path=str(log.path), data=str(spec.path),
                                train_rows=len(train), eval_rows=len(held) if held is not None else 0,
                                seconds=time.perf_counter() - t0, **report)
    acc = summary["eval_last"].get("accuracy", float("nan"))
    print(f"rm: held-out accuracy {acc:.3f}; model saved to {out} ({summary['seconds']:.1f} s)", flush=True)
    return summary
