"""The reference role: the frozen starting policy, scoring each response token's log-prob for the KL leash."""

from __future__ import annotations

import pyarrow as pa
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch
from rlhf_dist.models.load import load_causal_lm, load_tokenizer
from rlhf_dist.models.logprobs import chunk_logprobs
from rlhf_dist.workers.common import derive_seed, device, setup_process


class ReferenceWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        setup_process(derive_seed(cfg.seed, 3, rank), cfg.roles.reference.num_cpus)
        self.cfg = cfg
        path = cfg.model.reference or cfg.model.policy
        self.model = load_causal_lm(path, dtype=cfg.model.dtype, device=device()).eval()
        self.model.requires_grad_(False)
        self.pad_token_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy).pad_token_id

    @torch.no_grad()
    def logprobs(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        step = self.cfg.train.micro_batch_size or max(1, len(batch))
        chunks = [batch.slice(s, step) for s in range(0, len(batch), step)]
        lp = chunk_logprobs(self.model, chunks, self.pad_token_id, self.cfg.generation.temperature, device())
        return make_batch({S.REF_LOGPROBS: lp})
