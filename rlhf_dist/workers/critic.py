"""The critic learner: a value head on the policy's backbone, trained on GAE returns with a clipped value loss."""

from __future__ import annotations

import pyarrow as pa
import torch

from rlhf_dist.algo import value_loss
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import from_padded, make_batch
from rlhf_dist.models.load import load_critic
from rlhf_dist.models.logprobs import response_values
from rlhf_dist.workers.learner import Learner


class CriticWorker(Learner):
    role = "critic"

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size, role_seed=5)

    def build_model(self) -> torch.nn.Module:
        return load_critic(self.cfg.model.critic or self.cfg.model.policy, dtype=self.cfg.model.dtype)

    def learning_rate(self) -> float:
        return self.cfg.train.critic_lr

    @torch.no_grad()
    def values(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.engine.eval()
        parts = []
        for chunk in self.inference_chunks(batch):
            seqs, _ = self.tensors(chunk, ())
            values = response_values(self.engine, seqs) * seqs.response_mask
            parts.append(from_padded(values.float().cpu(), seqs.response_lens.cpu()))
        return make_batch({S.VALUES: pa.concat_arrays(parts) if parts else pa.array([], S.PER_TOKEN)})

    def train(self, batch: pa.RecordBatch) -> dict[str, float]:
        self.engine.train()
        clip = self.cfg.algo.value_clip

        def loss_fn(micro: pa.RecordBatch):
            columns = (S.VALUES, S.RETURNS)
            seqs, x, mask = self.training_tensors(micro, columns, checked=columns)
            values = response_values(self.engine, seqs)
            loss, stats = value_loss(values, x[S.VALUES], x[S.RETURNS], mask, clip_eps=clip)
            out = {f"critic/{k}": v for k, v in stats.items()}
            out["critic/value_loss"] = loss.detach()
            return loss, out

        return self.fit(batch, loss_fn)
