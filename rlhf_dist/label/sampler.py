"""Pairs sampled on demand (`label.pairs=sample`): collect.policy, loaded in the server's process (HF engine), answers
each of the next `label.sample_prompts` prompts twice whenever the unlabelled pairs run low. Each chunk is written to
`<label.output>/pairs/part-NNNNN.parquet`, so a restarted server shows the same pairs and samples on from there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_batches, repeat_interleave
from rlhf_dist.data.prompts import read_prompt_texts, tokenize_prompts
from rlhf_dist.label.pairs import CANDIDATE_SCHEMA, Pair, pairs_of, write_atomic
from rlhf_dist.trainers.collect import pair_up
from rlhf_dist.trainers.offline import with_model
from rlhf_dist.workers.rollout import RolloutWorker


class PairSampler:
    """Two answers per prompt from collect.policy, a chunk of prompts at a time, in this process (HF engine)."""

    def __init__(self, cfg: RunConfig, folder: Path):
        self.cfg, self.folder = cfg, folder / "pairs"
        self.chunk = cfg.label.sample_prompts
        data = dataclasses.replace(cfg.data, num_prompts=cfg.collect.num_prompts)
        self.texts = read_prompt_texts(dataclasses.replace(cfg, data=data))[: cfg.collect.num_prompts]
        self.policy = cfg.collect.policy or cfg.model.policy
        if not (Path(self.policy) / "config.json").exists():
            raise ConfigError("collect.policy", f"{self.policy!r} is not a saved model; fix the path or run sft")
        self.worker = None

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def existing(self) -> list[Pair]:
        """The pairs sampled before (by this server or an earlier one), in order."""
        return [p for f in self.parts() for p in pairs_of(pq.read_table(f, schema=CANDIDATE_SCHEMA))]

    def exhausted(self) -> bool:
        return len(self.parts()) * self.chunk >= len(self.texts)

    def sample_next(self) -> list[Pair]:
        """Samples the next chunk, writes it (temp file, then rename) and returns its pairs; pair_id = prompt index."""
        if self.worker is None:
            self.worker = RolloutWorker(with_model(self.cfg, policy=self.policy))
        k = len(self.parts())
        start = k * self.chunk
        prompts = tokenize_prompts(
            self.texts[start : start + self.chunk],
            self.worker.tokenizer,
            self.cfg.data.max_prompt_tokens,
            self.cfg.data.chat_template,
        )
        samples = self.worker.generate(repeat_interleave(concat_batches(prompts.to_batches()), 2), iteration=k)
        pairs = pair_up(samples, first_id=start)
        version = int(samples.column(S.POLICY_VERSION)[0].as_py()) if len(samples) else 0
        table = pa.table(
            [
                pairs.column("pair_id"),
                pairs.column(S.PROMPT_TEXT),
                pairs.column("response_a"),
                pairs.column("response_b"),
                pa.array([version] * len(pairs), pa.int64()),
                pa.array([version] * len(pairs), pa.int64()),
            ],
            schema=CANDIDATE_SCHEMA,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(table, self.folder / f"part-{k:05d}.parquet")
        return pairs_of(table)
