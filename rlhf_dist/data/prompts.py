"""Prompt sets for RL: tokenised once into an Arrow table, then served a fixed number per iteration."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rlhf_dist.config import RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.chat import ChatFormat, Conversation
from rlhf_dist.data.datasets import DataError, DatasetSpec, load_table
from rlhf_dist.data.synthetic import make_prompts


def read_prompt_texts(cfg: RunConfig) -> list[str] | list[Conversation]:
    """The synthetic task's data.num_prompts prompts, or every row of data.prompts' prompt column: plain text, or
    messages lists (``[{"role": "user", "content": "..."}]``, TRL's conversational format) for tokenize_prompts to
    put through the chat template.

    A file goes through the validated readers (rlhf_dist.data.datasets), so any bad input is one DataError line
    naming data.prompts, the file, the row and the column, and the fix.
    """
    d = cfg.data
    if d.task == "synthetic":
        return make_prompts(d.num_prompts, seed=cfg.seed)
    spec = DatasetSpec(d.prompts, "prompts", columns={"prompt": d.prompt_column}, column_key="data.prompt_column")
    try:
        table = load_table(spec)
    except (OSError, ValueError) as err:  # ValueError covers DataError and pyarrow's ArrowInvalid
        message = " ".join(str(err).split())
        if str(d.prompts) not in message:  # pyarrow's own messages (a corrupt Parquet footer) name no file
            message = f"{d.prompts}: {message}"
        raise DataError(f"data.prompts: {message}") from err
    if table.num_rows == 0:
        raise DataError(
            f"data.prompts: {d.prompts}: no prompts in the file; add rows with a {d.prompt_column!r} column"
        )
    return table.column("prompt").to_pylist()


def tokenize_prompts(
    prompts: list[str] | list[Conversation], tokenizer, max_tokens: int, chat_template: str = "auto"
) -> pa.Table:
    """The prompts as the policy sees them (``chat_template``: data.chat_template, rlhf_dist.data.chat) in
    ``prompt_text``, which the reward function reads, and their tokens, which the reward model reads after the
    prompt. Prompts that tokenise to nothing are dropped; longer ones keep their last ``max_tokens`` tokens."""
    chat = ChatFormat.from_setting(chat_template)
    texts, templated = chat.prompts(tokenizer, prompts, lambda i: f"data.prompts: row {i}")
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
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
            raise DataError(
                f"data.prompts: {table.num_rows} prompt{'' if table.num_rows == 1 else 's'}, fewer than "
                f"train.prompts_per_iteration={per_iteration}; "
                f"add prompts (data.prompts, or data.num_prompts for the synthetic task) or lower "
                f"train.prompts_per_iteration"
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
