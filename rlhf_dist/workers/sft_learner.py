"""The SFT learner: next-token cross-entropy on the response tokens only (the prompt is context, not a target)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.models.load import load_causal_lm
from rlhf_dist.models.logprobs import response_logprobs
from rlhf_dist.workers.dataset_learner import DatasetLearner


class SFTLearner(DatasetLearner):
    section = "sft"
    role_seed = 11

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.cfg.model.policy, dtype=self.cfg.model.dtype)

    def _nll(self, batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood of every response token [B, T] and the response mask [B, T] (float)."""
        seqs, _ = self.tensors(batch, ())
        logprobs = response_logprobs(self.engine, seqs)
        mask = seqs.response_mask.float()
        return -logprobs * mask, mask

    def weight(self, micro: pa.RecordBatch) -> float:
        return float(pc.sum(pc.list_value_length(micro.column(S.RESPONSE_IDS))).as_py() or 0)

    def loss(self, micro: pa.RecordBatch):
        nll, mask = self._nll(micro)
        loss = nll.sum() / mask.sum().clamp(min=1)  # mean over the micro-batch's response tokens
        return loss, {"loss": loss.detach()}

    def eval_sums(self, chunk: pa.RecordBatch) -> dict[str, float]:
        nll, mask = self._nll(chunk)
        return {"nll": float(nll.sum()), "tokens": float(mask.sum())}

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nll"] / max(1.0, sums["tokens"])
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
