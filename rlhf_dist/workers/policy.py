"""The policy learner: PPO's clipped objective on its shard of the experience, and the weights the rollout needs."""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from rlhf_dist.algo import decoupled_ppo_loss, kl_estimate, masked_mean, ppo_policy_loss
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch, split_even
from rlhf_dist.models.load import load_causal_lm
from rlhf_dist.models.logprobs import chunk_logprobs, response_logprobs
from rlhf_dist.workers.common import device
from rlhf_dist.workers.learner import Learner


class PolicyWorker(Learner):
    role = "policy"

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size, role_seed=4)

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.cfg.model.policy, dtype=self.cfg.model.dtype)

    def learning_rate(self) -> float:
        return self.cfg.train.policy_lr

    @torch.no_grad()
    def logprobs(self, batch: pa.RecordBatch, subset: bool = False) -> pa.RecordBatch:
        """``old_logprobs``: the learner's view of the sampled tokens before this iteration's update. ``subset``: a
        sample of the iteration's batch (the driver's stale-weight check), in as many equal shards as there are
        ranks, cut into chunks of at most a micro-batch (the config's chunk count assumes the whole batch)."""
        self.engine.eval()
        chunks = split_even(batch, math.ceil(len(batch) / self.micro_size)) if subset else self.inference_chunks(batch)
        lp = chunk_logprobs(
            self.engine,
            chunks,
            self.tokenizer.pad_token_id,
            self.cfg.generation.temperature,
            device(),
        )
        return make_batch({S.OLD_LOGPROBS: lp})

    def train(self, batch: pa.RecordBatch) -> dict[str, float]:
        self.engine.train()
        a, g = self.cfg.algo, self.cfg.generation
        correction = a.off_policy_correction()
        own_old = self.cfg.train.skips_old_logprobs(a)  # one on-policy step: the batch carries no old_logprobs
        columns = (S.ADVANTAGES,) + (() if own_old else (S.OLD_LOGPROBS,)) + (S.REF_LOGPROBS, S.ROLLOUT_LOGPROBS)
        checked = columns if correction != "none" else columns[:-1]  # rollout log-probs only count when corrected

        def loss_fn(micro: pa.RecordBatch):
            seqs, x, mask = self.training_tensors(micro, columns, checked)
            logprobs, entropy = response_logprobs(self.engine, seqs, temperature=g.temperature, return_entropy=True)
            # at the one step's start the policy is the old one: ratio 1, PPO's gradient is the policy gradient
            old = logprobs.detach() if own_old else x[S.OLD_LOGPROBS]
            if correction == "none":
                loss, stats = ppo_policy_loss(
                    logprobs, old, x[S.ADVANTAGES], mask, clip_eps=a.clip_eps, dual_clip=a.dual_clip
                )
            else:  # the samples come from the rollout engine's (older, or numerically different) policy
                loss, stats = decoupled_ppo_loss(
                    logprobs,
                    old,
                    x[S.ROLLOUT_LOGPROBS],
                    x[S.ADVANTAGES],
                    mask,
                    correction,
                    tis_cap=a.tis_cap,
                    icepop_band=(a.icepop_low, a.icepop_high),
                    clip_eps=a.clip_eps,
                    dual_clip=a.dual_clip,
                )
            ent = masked_mean(entropy, mask)
            if a.entropy_coef:
                loss = loss - a.entropy_coef * ent
            kl = masked_mean(kl_estimate(logprobs, x[S.REF_LOGPROBS], mask, a.kl_estimator), mask)
            if a.kl_mode == "loss":  # GRPO-style leash in the loss instead of the reward
                loss = loss + a.kl_coef * kl
            stats = {f"policy/{k}": v for k, v in stats.items()}
            stats.update(
                {"policy/loss": loss.detach(), "policy/entropy": ent.detach(), "policy/kl_to_ref": kl.detach()}
            )
            return loss, stats

        return self.fit(batch, loss_fn)
