"""What the SFT, reward-model and DPO learners share: one optimizer step per `train` call on a fixed data set.

The driver cuts each epoch into global batches of `<stage>.batch_size` rows (a multiple of the learner count) and
scatters every batch over the group, so all ranks hold equal shards, run the same number of micro-batches and stay
in lock-step for ZeRO's collectives. `evaluate` returns sums, not means, so the driver pools ranks exactly.

Preference pairs travel as one row per pair (`prompt_ids`, `chosen_ids`, `rejected_ids`); `stack_pairs` turns them
into the joined-sequence layout of docs/CONTRACTS.md, chosen rows first, so both answers go through one forward pass.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import Sequences, split_even
from rlhf_dist.models.logprobs import response_logprobs
from rlhf_dist.workers.learner import Learner

CHOSEN_IDS, REJECTED_IDS = "chosen_ids", "rejected_ids"  # as rlhf_dist.data.datasets.tokenize names them


def stack_pairs(batch: pa.RecordBatch) -> pa.RecordBatch:
    """B pairs -> 2B rows of (prompt_ids, response_ids): rows 0..B-1 answer with `chosen`, rows B..2B-1 with
    `rejected`."""
    prompts = batch.column(S.PROMPT_IDS)
    return pa.RecordBatch.from_arrays(
        [
            pa.concat_arrays([prompts, prompts]),
            pa.concat_arrays([batch.column(CHOSEN_IDS), batch.column(REJECTED_IDS)]),
        ],
        schema=pa.schema([pa.field(S.PROMPT_IDS, S.TOKENS), pa.field(S.RESPONSE_IDS, S.TOKENS)]),
    )


def summed_logprobs(model: torch.nn.Module, seqs: Sequences) -> torch.Tensor:
    """log pi(response | prompt) of every row: per-token log-probs at temperature 1 summed over the response, [B]."""
    return (response_logprobs(model, seqs) * seqs.response_mask).sum(dim=1)


class DatasetLearner(Learner):
    """A Learner whose step size and threads come from its own config section (`sft`, `rm` or `dpo`)."""

    section = ""  # the config section, also the prefix of every metric
    role_seed = 0

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        # These stages size their threads from their own `<stage>.learners`, not the PPO roles table.
        self.stage = getattr(cfg, self.section)
        self.role = self.section
        super().__init__(cfg, rank, world_size, self.role_seed, num_cpus=self.stage.learners.num_cpus)

    def learning_rate(self) -> float:
        return self.stage.lr

    def plan_steps(self) -> None:
        """Every rank holds batch_size / world_size rows per step (validated: a multiple), cut into micro-batches."""
        per_rank = self.stage.batch_size // self.world_size
        self.micro_size = min(self.stage.micro_batch_size or per_rank, per_rank)
        self.micro_per_step = math.ceil(per_rank / self.micro_size)

    # -- what a stage defines -------------------------------------------------------------------------------
    def loss(self, micro: pa.RecordBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss over the micro-batch's units (tokens or pairs) and statistics to report."""
        raise NotImplementedError

    def weight(self, micro: pa.RecordBatch) -> float:
        """How many units the micro-batch's mean loss averages over (rows by default)."""
        return float(len(micro))

    def eval_sums(self, chunk: pa.RecordBatch) -> dict[str, float]:
        """Held-out statistics of one chunk as sums (the driver divides after pooling every rank)."""
        raise NotImplementedError

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Pooled sums of every rank -> the held-out metrics (pure: the driver calls it without an actor)."""
        raise NotImplementedError

    # -- the calls the driver makes -----------------------------------------------------------------------
    def train(self, batch: pa.RecordBatch) -> dict[str, float]:
        """One optimizer step on this rank's shard; statistics are means over the shard's units."""
        self.engine.train()
        micros = split_even(batch, self.micro_per_step)
        weights = [self.weight(m) for m in micros]
        total = sum(weights) or 1.0
        stats: dict[str, float] = {}
        for micro, w in zip(micros, weights):
            loss, micro_stats = self.loss(micro)
            # The engine divides every backward by the number of micro-batches; scaling each mean by its share of
            # the units makes the accumulated gradient the mean over all units of the shard, uneven cuts included.
            self.engine.backward(loss * (w * len(micros) / total))
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v) * w / total
        stats.update({k: float(v) for k, v in self.engine.step().items()})
        return {f"{self.section}/{k}": v for k, v in stats.items()}

    @torch.no_grad()
    def evaluate(self, batch: pa.RecordBatch) -> dict[str, float]:
        """Sums over this rank's shard of the held-out set (equal shards: as many forward passes on every rank)."""
        self.engine.eval()
        sums: dict[str, float] = {}
        for chunk in split_even(batch, math.ceil(len(batch) / self.micro_size)):
            for k, v in self.eval_sums(chunk).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums


def pairwise_eval_sums(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Held-out sums over preference pairs (reward model and DPO alike): the pair count, the loss, the pairs ranked
    right, the margin; ``pairwise_eval_metrics`` turns the pooled sums into means."""
    n = len(chosen)
    return {
        "pairs": float(n),
        "loss": float(loss) * n,
        "correct": float((chosen > rejected).sum()),
        "margin": float((chosen - rejected).sum()),
    }


def pairwise_eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    n = max(1.0, sums["pairs"])
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "margin": sums["margin"] / n}
