"""Models from local directories, the tiny default model, the critic, and per-token log-probs for every role."""

from rlhf_dist.models.load import (
    check_model_dir,
    load_causal_lm,
    load_critic,
    load_reward_model,
    load_tokenizer,
    resolve_dtype,
)
from rlhf_dist.models.logprobs import chunk_logprobs, response_logprobs, response_values, sequence_scores
from rlhf_dist.models.tiny import build_tiny
from rlhf_dist.models.value_head import CriticModel

__all__ = [
    "CriticModel",
    "build_tiny",
    "check_model_dir",
    "chunk_logprobs",
    "load_causal_lm",
    "load_critic",
    "load_reward_model",
    "load_tokenizer",
    "resolve_dtype",
    "response_logprobs",
    "response_values",
    "sequence_scores",
]
