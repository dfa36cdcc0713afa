"""The labeller role: given two responses to one prompt, say which is better.

Three judges (`collect.judge`):
- simulated: a rater who sees a hidden utility u (`collect.utility`, the synthetic task's gold score by default) and
  prefers a over b with the Bradley-Terry probability sigmoid((u_a - u_b) / T) (T = `collect.noise_temperature`;
  T = 0 always picks the higher utility, a tie is a coin toss); then a share `collect.flip_rate` of the labels is
  flipped, standing for raters who disagree with the rest, or misclick.
- function: an AI judge (RLAIF): a reward function 'module:function' scores both; the higher one wins.
- reward_model: an AI judge: a local reward model scores both; the higher one wins.

Every random draw of pair k comes from a generator seeded by (run seed, k), so the labels do not depend on how many
labellers there are or which of them got the pair.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlhf_dist.config import resolve_function
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import to_sequences
from rlhf_dist.data.datasets import DatasetSpec, tokenize
from rlhf_dist.data.synthetic import gold_reward
from rlhf_dist.models.load import load_reward_model, load_tokenizer
from rlhf_dist.models.logprobs import sequence_scores
from rlhf_dist.workers.common import derive_seed, device, setup_process
from rlhf_dist.workers.dataset_learner import stack_pairs

# A batch of pairs to judge: one row per (prompt, response a, response b), from rlhf_dist.trainers.collect. Judges
# read text (the prompt's ids only balance the scatter): a reward-model judge tokenises with its own tokenizer.
PAIR_ID, A_TEXT, B_TEXT = "pair_id", "response_a", "response_b"
PAIR_SCHEMA = pa.schema(
    [
        pa.field(PAIR_ID, pa.int64()),
        pa.field(S.PROMPT_TEXT, pa.string()),
        pa.field(S.PROMPT_IDS, S.TOKENS),
        pa.field(A_TEXT, pa.string()),
        pa.field(B_TEXT, pa.string()),
    ]
)
# What a labeller returns, one row per pair: the preference columns every stage reads, and how the label came about.
LABEL_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("judge", pa.string()),  # simulated | function | reward_model
        pa.field("labeller", pa.int32()),  # rank of the labeller actor
        pa.field("score_chosen", pa.float32()),  # what the judge saw: utility, function or reward-model score
        pa.field("score_rejected", pa.float32()),
        pa.field("p_chosen", pa.float32()),  # the judge's P(chosen over rejected); low on a flipped label
        pa.field("flipped", pa.bool_()),  # a simulated disagreement/misclick turned the label around
        pa.field(PAIR_ID, pa.int64()),
    ]
)


def synthetic_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """The synthetic task's gold score in the batch form of a reward function: the utility simulated raters see."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def bradley_terry_prob(u_a: np.ndarray, u_b: np.ndarray, temperature: float) -> np.ndarray:
    """P(a preferred over b) = sigmoid((u_a - u_b) / T); T = 0 is the step function with 0.5 at a tie."""
    diff = np.asarray(u_a, np.float64) - np.asarray(u_b, np.float64)
    if temperature == 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-diff / temperature))


class LabellerWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        setup_process(derive_seed(cfg.seed, 7, rank), cfg.collect.labellers.num_cpus)
        self.cfg, self.rank = cfg, rank
        c = cfg.collect
        self.judge = c.judge
        self.function = self.model = None
        if c.judge == "simulated":
            self.function = resolve_function("collect.utility", c.utility)
        elif c.judge == "function":
            self.function = resolve_function("collect.judge_function", c.judge_function)
        else:
            self.model = load_reward_model(c.judge_model, dtype=cfg.model.dtype).to(device()).eval()
            self.tokenizer = load_tokenizer(c.judge_model)

    def label(self, pairs: pa.RecordBatch) -> pa.RecordBatch:
        """One LABEL_SCHEMA row per pair of `pairs` (PAIR_SCHEMA), in the same order."""
        u_a, u_b = self._scores(pairs)
        ids = pairs.column(PAIR_ID).to_numpy(zero_copy_only=False)
        draws = np.array([np.random.default_rng([self.cfg.seed, int(k)]).random(2) for k in ids]).reshape(-1, 2)
        if self.judge == "simulated":
            p_a = bradley_terry_prob(u_a, u_b, self.cfg.collect.noise_temperature)
            flipped = draws[:, 1] < self.cfg.collect.flip_rate
        else:  # an AI judge is deterministic: the higher score wins, a tie is a coin toss
            p_a = bradley_terry_prob(u_a, u_b, 0.0)
            flipped = np.zeros(len(ids), bool)
        a_wins = (draws[:, 0] < p_a) != flipped
        a, b = pairs.column(A_TEXT), pairs.column(B_TEXT)
        mask = pa.array(a_wins)
        return pa.RecordBatch.from_arrays(
            [
                pairs.column(S.PROMPT_TEXT),
                pc.if_else(mask, a, b),
                pc.if_else(mask, b, a),
                pa.array([self.judge] * len(ids), pa.string()),
                pa.array(np.full(len(ids), self.rank, np.int32)),
                pa.array(np.where(a_wins, u_a, u_b).astype(np.float32)),
                pa.array(np.where(a_wins, u_b, u_a).astype(np.float32)),
                pa.array(np.where(a_wins, p_a, 1 - p_a).astype(np.float32)),
                pa.array(flipped),
                pairs.column(PAIR_ID),
            ],
            schema=LABEL_SCHEMA,
        )

    def _scores(self, pairs: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        if self.function is not None:
            prompts = pairs.column(S.PROMPT_TEXT).to_pylist()
            scores = [
                np.asarray(self.function(prompts, pairs.column(c).to_pylist()), np.float64) for c in (A_TEXT, B_TEXT)
            ]
            for s in scores:
                if s.shape != (len(prompts),):
                    raise ValueError(
                        f"collect: the judge function returned shape {s.shape}, expected one float "
                        f"per response ({len(prompts)})"
                    )
            return scores[0], scores[1]
        return self._model_scores(pairs)

    @torch.no_grad()
    def _model_scores(self, pairs: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """Both answers scored as `rlhf-dist rm` trained on them: the same tokenisation (answer + EOS), last token."""
        texts = pa.RecordBatch.from_arrays(
            [pairs.column(S.PROMPT_TEXT), pairs.column(A_TEXT), pairs.column(B_TEXT)],
            names=["prompt", "chosen", "rejected"],
        )
        spec = DatasetSpec(self.cfg.collect.judge_model, "preferences")
        tokens = next(tokenize(iter([texts]), self.tokenizer, spec, apply_chat_template=False))
        seqs = to_sequences(stack_pairs(tokens), self.tokenizer.pad_token_id).to(device())
        scores = (
            sequence_scores(self.model, seqs.input_ids, seqs.attention_mask, seqs.last_token_index(), seqs.position_ids)
            .cpu()
            .double()
            .numpy()
        )
        return scores[: len(pairs)], scores[len(pairs) :]
