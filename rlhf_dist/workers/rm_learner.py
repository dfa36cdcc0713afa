"""The reward-model learner: Bradley-Terry on (chosen, rejected), scored at each answer's last token."""

from __future__ import annotations

import pyarrow as pa
import torch

from rlhf_dist.algo import bradley_terry_loss
from rlhf_dist.models.load import load_reward_model
from rlhf_dist.models.logprobs import sequence_scores
from rlhf_dist.workers.dataset_learner import DatasetLearner, pairwise_eval_metrics, pairwise_eval_sums, stack_pairs


class RMLearner(DatasetLearner):
    section = "rm"
    role_seed = 12

    def build_model(self) -> torch.nn.Module:
        # Same seed on every rank: the fresh score head starts identical everywhere.
        return load_reward_model(
            self.stage.init or self.cfg.model.policy, dtype=self.cfg.model.dtype, seed=self.cfg.seed
        )

    def _scores(self, batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward of the chosen and of the rejected answer of every pair, [B] each, from one forward pass."""
        seqs, _ = self.tensors(stack_pairs(batch), ())
        scores = sequence_scores(
            self.engine, seqs.input_ids, seqs.attention_mask, seqs.last_token_index(), seqs.position_ids
        )
        return scores[: len(batch)], scores[len(batch) :]

    def loss(self, micro: pa.RecordBatch):
        chosen, rejected = self._scores(micro)
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "margin": (chosen - rejected).mean().detach()}

    def eval_sums(self, chunk: pa.RecordBatch) -> dict[str, float]:
        chosen, rejected = self._scores(chunk)
        loss, _ = bradley_terry_loss(chosen, rejected)
        return pairwise_eval_sums(loss, chosen, rejected)

    eval_metrics = staticmethod(pairwise_eval_metrics)
