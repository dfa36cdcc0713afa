"""Prompt sets for RL: tokenised once into an Arrow table, then served a fixed number per iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.synthetic import make_prompts


def read_prompt_texts(cfg: RunConfig) -> list[str]:
    d = cfg.data
    if d.task == "synthetic":
        return make_prompts(d.num_prompts, seed=cfg.seed)
    path = Path(d.prompts)
    if not path.exists():
        raise FileNotFoundError(f"data.prompts: {path} does not exist; point it at a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix in (".jsonl", ".json"):
        table = pj.read_json(path)
    else:
        raise ValueError(f"data.prompts: {path} has suffix {path.suffix!r}; use .jsonl or .parquet")
    if d.prompt_column not in table.column_names:
        raise KeyError(
            f"data.prompts: {path} has no column {d.prompt_column!r} (columns: {table.column_names}); "
            f"set data.prompt_column"
        )
    return table.column(d.prompt_column).to_pylist()


def tokenize_prompts(texts: list[str], tokenizer, max_tokens: int) -> pa.Table:
    """Prompts that tokenise to nothing are dropped; longer ones keep their last ``max_tokens`` tokens."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    keep = [i for i, x in enumerate(ids) if len(x) > 0]
    return pa.table(
        {
            S.PROMPT_TEXT: pa.array([texts[i] for i in keep], pa.string()),
            S.PROMPT_IDS: pa.array([ids[i][-max_tokens:] for i in keep], S.TOKENS),
        }
    )


class PromptSampler:
    """Shuffled passes over the prompt table; its state (epoch, position) is part of a checkpoint."""

    def __init__(self, table: pa.Table, per_iteration: int, samples_per_prompt: int, seed: int):
        if per_iteration > table.num_rows:
            raise ValueError(
                f"train.prompts_per_iteration={per_iteration} is more than the {table.num_rows} prompts available; "
                f"lower it or add prompts"
            )
        self.table, self.per_iteration, self.n, self.seed = table, per_iteration, samples_per_prompt, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.table.num_rows)

    def next_batch(self) -> pa.RecordBatch:
        if self.position + self.per_iteration > self.table.num_rows:
            self.epoch, self.position = self.epoch + 1, 0
        rows = self._order()[self.position : self.position + self.per_iteration]
        self.position += self.per_iteration
        prompts = self.table.take(pa.array(rows))
        # Each prompt repeated n times in a row; group_id ties siblings together for GRPO/RLOO.
        take = np.repeat(np.arange(len(rows)), self.n)
        batch = prompts.take(pa.array(take)).combine_chunks().to_batches()[0]
        batch = batch.append_column(
            S.GROUP_ID, pa.array(rows[take].astype(np.int64) + self.epoch * self.table.num_rows)
        )
        return batch.append_column(S.SAMPLE_ID, pa.array(np.arange(len(take), dtype=np.int64)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
