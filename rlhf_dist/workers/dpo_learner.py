"""The DPO learner: the policy against precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`).

Why precomputed, not a frozen copy inside the learner: the reference never changes and the pairs are fixed, so its
log-probs are computed once for the whole set by the existing reference actors (`ReferenceWorker`), instead of once
per epoch here; the learners hold one model, not two, which is the memory that matters when the model is large.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from rlhf_dist.algo import dpo_loss
from rlhf_dist.models.load import load_causal_lm
from rlhf_dist.workers.dataset_learner import (
    DatasetLearner,
    pairwise_eval_metrics,
    pairwise_eval_sums,
    stack_pairs,
    summed_logprobs,
)

REF_CHOSEN, REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"  # float32 per pair, summed over tokens


class DPOLearner(DatasetLearner):
    section = "dpo"
    role_seed = 13

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.cfg.model.policy, dtype=self.cfg.model.dtype)

    def _terms(self, batch: pa.RecordBatch):
        """(loss, implicit reward of chosen [B], of rejected [B]) of the pairs in `batch`."""
        seqs, _ = self.tensors(stack_pairs(batch), ())
        logps = summed_logprobs(self.engine, seqs)
        dev = logps.device
        ref_c, ref_r = (
            torch.tensor(batch.column(c).to_numpy(zero_copy_only=False), dtype=torch.float32, device=dev)
            for c in (REF_CHOSEN, REF_REJECTED)
        )
        d = self.stage
        return dpo_loss(
            logps[: len(batch)],
            logps[len(batch) :],
            ref_c,
            ref_r,
            beta=d.beta,
            loss_type=d.loss_type,
            label_smoothing=d.label_smoothing,
        )

    def loss(self, micro: pa.RecordBatch):
        loss, chosen, rejected = self._terms(micro)
        return loss, {
            "loss": loss.detach(),
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
        }

    def eval_sums(self, chunk: pa.RecordBatch) -> dict[str, float]:
        loss, chosen, rejected = self._terms(chunk)
        return pairwise_eval_sums(loss, chosen, rejected)

    eval_metrics = staticmethod(pairwise_eval_metrics)
