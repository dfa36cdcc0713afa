"""What the SFT, reward-model and DPO drivers share: the data set in, epochs of batches out, metrics pooled.

Everything before `train_epochs` runs on the driver without a cluster, so a bad row fails (naming file, row and
column) before any actor starts.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data.batch import concat_batches
from rlhf_dist.data.chat import AUTO, ChatFormat
from rlhf_dist.data.datasets import DataError, DatasetSpec, read_batches, tokenize
from rlhf_dist.metrics import MetricsLog, mean_of_dicts
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.orchestration.learner_groups import learner_group


def stage_output(cfg: RunConfig, stage: str) -> Path:
    """Where a stage saves its model: `<stage>.output`, else `<output_dir>/<stage>`."""
    return Path(getattr(cfg, stage).output or Path(cfg.output_dir) / stage)


def with_model(cfg: RunConfig, **model_fields) -> RunConfig:
    """A copy of `cfg` whose `model` section has these fields replaced (the stages hand models to each other)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_fields))


def dataset_spec(cfg: RunConfig, stage: str, kind: str, path: str | Path) -> DatasetSpec:
    d = getattr(cfg, stage).data
    return DatasetSpec(
        path, kind, columns=dict(d.columns), split=d.split, max_tokens=d.max_tokens, on_overlong=d.on_overlong
    )


def read_tokenized(spec: DatasetSpec, tokenizer, key: str, chat: ChatFormat = AUTO) -> tuple[pa.RecordBatch, dict]:
    """The whole validated set as one batch of token columns (`prompt_ids` + `response_ids` or `chosen_ids`,
    `rejected_ids`) and a report of what was kept. A bad row is a ConfigError on `key` (the data path) that names
    the file, row and column, so the command line reports it as a user error before any actor starts.

    Rows are plain text or messages lists, put through the chat template as ``chat`` (data.chat_template) says: the
    PPO prompts (rlhf_dist.data.prompts) go through the same, so a model trained here meets its prompts in the form
    it was trained on.
    """
    try:
        tokens = tokenize(read_batches(spec), tokenizer, spec, chat=chat)
        batches = [b.select([c for c in b.schema.names if c.endswith("_ids")]) for b in tokens]
    except (DataError, FileNotFoundError) as err:
        raise ConfigError(key, str(err)) from None
    if not batches:
        raise ConfigError(
            key, f"{spec.path}: no rows left to train on ({tokens.report}); check the file and max_tokens"
        )
    report = {
        "rows_in": tokens.report.rows_in,
        "rows_kept": tokens.report.rows_out,
        "dropped_overlong": tokens.report.dropped_overlong,
    }
    return concat_batches(batches), report


def split_held_out(
    batch: pa.RecordBatch, stage_cfg, seed: int, stage: str
) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
    """A seeded split into (train, held out). The held-out size is a multiple of the learner count (equal shards
    keep ZeRO ranks in lock-step; at most num_actors - 1 rows go unused); the training set needs one full batch."""
    n, world = len(batch), stage_cfg.learners.num_actors
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_held = int(round(stage_cfg.eval_fraction * n)) // world * world
    if stage_cfg.eval_fraction > 0 and n_held == 0:
        n_held = world
    if n - n_held < stage_cfg.batch_size:
        raise ConfigError(
            f"{stage}.batch_size",
            f"{stage_cfg.batch_size}, but only {n - n_held} training rows are "
            f"left ({n} rows, {n_held} held out); lower it or add data",
        )
    held = batch.take(pa.array(order[:n_held])) if n_held else None
    return batch.take(pa.array(order[n_held:])), held


def epoch_batches(batch: pa.RecordBatch, batch_size: int, seed: int, epoch: int) -> list[pa.RecordBatch]:
    """This epoch's shuffled global batches; the last partial one is dropped (every step takes full shards)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(batch))
    return [batch.take(pa.array(order[i : i + batch_size])) for i in range(0, len(batch) - batch_size + 1, batch_size)]


def pooled(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(sum(d[k] for d in dicts)) for k in dicts[0]}


def train_epochs(
    group,
    learner_cls,
    train: pa.RecordBatch,
    held: pa.RecordBatch | None,
    stage_cfg,
    seed: int,
    stage: str,
    log: MetricsLog,
) -> list[dict]:
    """Evaluate, then for every epoch: one optimizer step per global batch, scattered over the learners, and
    evaluate again on the held-out set. Returns the logged rows (one per epoch, plus the one before training)."""

    def evaluate() -> dict[str, float]:
        if held is None:
            return {}
        sums = pooled(group.scatter("evaluate", held).get())
        return {f"eval/{k}": v for k, v in learner_cls.eval_metrics(sums).items()}

    row = {"epoch": 0, "step": 0, **evaluate()}
    log.log(row)
    print(f"{stage} before training: {_line(row)}", flush=True)
    step = 0
    for epoch in range(1, stage_cfg.epochs + 1):
        t0, stats = time.perf_counter(), []
        for batch in epoch_batches(train, stage_cfg.batch_size, seed, epoch):
            stats.append(mean_of_dicts(group.scatter("train", batch).get()))
            step += 1
        row = {
            "epoch": epoch,
            "step": step,
            **mean_of_dicts(stats),
            **evaluate(),
            "time/epoch": time.perf_counter() - t0,
        }
        log.log(row)
        print(f"{stage} epoch {epoch}/{stage_cfg.epochs}: {_line(row)}", flush=True)
    return log.rows


@dataclasses.dataclass
class StageData:
    """A stage's data set, tokenised and split, with what reading it dropped."""

    spec: DatasetSpec
    train: pa.RecordBatch
    held: pa.RecordBatch | None
    report: dict


def load_stage_data(cfg: RunConfig, stage: str, kind: str, path: str | Path) -> StageData:
    """Runs on the driver before any actor starts: a bad row fails here, naming file, row and column."""
    spec = dataset_spec(cfg, stage, kind, path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    chat = ChatFormat.from_setting(cfg.data.chat_template)
    data, report = read_tokenized(spec, tokenizer, f"{stage}.data.path", chat)
    train, held = split_held_out(data, getattr(cfg, stage), cfg.seed, stage)
    return StageData(spec, train, held, report)


def fit_and_save(cfg: RunConfig, stage: str, learner_cls, data: StageData, out: Path, log: MetricsLog) -> list[dict]:
    """The stage's learner group (inside the current Ray session) trains every epoch, then saves to ``out``."""
    stage_cfg = getattr(cfg, stage)
    with learner_group(stage, learner_cls, cfg, stage_cfg.learners) as learners:
        rows = train_epochs(learners, learner_cls, data.train, data.held, stage_cfg, cfg.seed, stage, log)
        learners.call("save_hf", str(out)).get()
    return rows


def stage_summary(stage: str, rows: list[dict], data: StageData, out: Path, log: MetricsLog, t0: float) -> dict:
    return summarize(
        stage,
        rows,
        model_path=str(out),
        metrics_path=str(log.path),
        data=str(data.spec.path),
        train_rows=len(data.train),
        eval_rows=len(data.held) if data.held is not None else 0,
        seconds=time.perf_counter() - t0,
        **data.report,
    )


def summarize(stage: str, rows: list[dict], **extra) -> dict:
    first, last = rows[0], rows[-1]
    return {
        "stage": stage,
        "epochs": int(last["epoch"]),
        "steps": int(last["step"]),
        "eval_first": {k[5:]: v for k, v in first.items() if k.startswith("eval/")},
        "eval_last": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
        "train_last": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{stage}/")},
        **extra,
    }


def _line(row: dict) -> str:
    keys = [k for k in row if k.startswith("eval/") or k.endswith(("/loss", "/accuracy", "/margin"))]
    return " ".join(f"{k}={row[k]:.4g}" for k in keys)
