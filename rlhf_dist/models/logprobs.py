"""Per-token log-probs, values and sequence scores on the joined-sequence layout (docs/CONTRACTS.md).

Every role (rollout check, reference, policy, critic, reward) reads its numbers through these three functions, so
the learner's log-probs and the reference's can only differ by the weights, never by an indexing convention.

Indexing, for row i and response token t (t < response_lens[i]):
    the token sits at position  prompt_lens[i] + t
    response_index[i, t]      = prompt_lens[i] + t - 1   (the logits there predict the token; the critic's value
                                                           of the state before the token is read there too)
    last_index[i]             = prompt_lens[i] + response_lens[i] - 1   (the last real token, scored by the RM)
Entries of response_index / response_ids_padded under a zero response mask may hold anything (they are clamped
into range); their outputs are finite but meaningless, and the caller masks them.
"""
from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DeepSpeedEngine / DistributedDataParallel (both keep it in `.module`)."""
    return getattr(model, "module", model)


def _gather_positions(per_position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """per_position [B, L, ...], index [B, T] -> [B, T, ...], index clamped into [0, L-1]."""
    rows = torch.arange(per_position.shape[0], device=per_position.device)[:, None]
    return per_position[rows, index.to(per_position.device).clamp(0, per_position.shape[1] - 1)]


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None, response_index: torch.Tensor,
                      response_ids_padded: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each response token under `model`, from one forward pass over the joined sequences.

    input_ids, attention_mask, position_ids: [B, L] (right padded; position_ids None lets the model count them).
    response_index [B, T]: position of the logits that predict each response token (module docstring).
    response_ids_padded [B, T]: the response tokens.
    Returns logprobs [B, T] float32 of log_softmax(logits / temperature), and with return_entropy also the entropy
    [B, T] float32 of that same distribution. Only the B*T needed rows of logits are upcast and normalised, never
    the whole [B, L, V].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits                                    # [B, L, V], model dtype
    picked = _gather_positions(logits, response_index).float() / temperature  # [B, T, V]
    log_probs = torch.log_softmax(picked, dim=-1)
    tokens = response_ids_padded.to(logits.device).clamp(0, logits.shape[-1] - 1)
    token_logprobs = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    if not return_entropy:
        return token_logprobs
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logprobs, entropy


def response_values(critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None, response_index: torch.Tensor) -> torch.Tensor:
    """Critic value of the state before each response token: [B, L] inputs, response_index [B, T] -> [B, T] float32."""
    values = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)  # [B, L]
    return _gather_positions(values, response_index).float()


def _score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `score` head; load reward models with "
                        f"rlhf_dist.models.load.load_reward_model (AutoModelForSequenceClassification, num_labels=1)")
    out_features = getattr(head, "out_features", 1)
    if out_features != 1:
        raise ValueError(f"{type(model).__name__}.score has {out_features} outputs; a reward model needs "
                         f"num_labels=1 (load it with load_reward_model)")
    return head


def sequence_scores(reward_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    last_index: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model score of each sequence at its last real token: [B, L] inputs, last_index [B] -> [B] float32.

    The score head runs on the hidden state at `last_index` picked here, not through Hugging Face's own pooling,
    which finds the last token by searching for pad_token_id and so goes wrong when pad == eos and a response ends
    with eos. Works on a DeepSpeed-wrapped model (its `.module` is used; parameters are fetched by module hooks).
    """
    model = _unwrap(reward_model)
    head = _score_head(model)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state                  # [B, L, H]
    last_hidden = _gather_positions(hidden, last_index.reshape(-1, 1)).squeeze(1)  # [B, H]
    return head(last_hidden).squeeze(-1).float()
