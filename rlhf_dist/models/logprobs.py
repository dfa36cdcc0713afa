"""Per-token log-probs, values and sequence scores on the joined-sequence layout (docs/CONTRACTS.md).

Every role (rollout check, reference, policy, critic, reward) reads its numbers through these functions, so the
learner's log-probs and the reference's can only differ by the weights, never by an indexing convention.

Indexing, for row i and response token t (t < response_lens[i]), as ``Sequences`` derives it:
    the token sits at position  prompt_lens[i] + t
    response_index()[i, t]    = prompt_lens[i] + t - 1   (the logits there predict the token; the critic's value
                                                           of the state before the token is read there too)
    last_token_index()[i]     = prompt_lens[i] + response_lens[i] - 1   (the last real token, scored by the RM)
Under a false response_mask the index and the token are placeholders (clamped into range); their outputs are
finite but meaningless, and the caller masks them.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import Sequences, from_padded, to_sequences


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DeepSpeedEngine / DistributedDataParallel (both keep it in `.module`)."""
    return getattr(model, "module", model)


def _gather_positions(per_position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """per_position [B, L, ...], index [B, T] -> [B, T, ...], index clamped into [0, L-1]."""
    rows = torch.arange(per_position.shape[0], device=per_position.device)[:, None]
    return per_position[rows, index.to(per_position.device).clamp(0, per_position.shape[1] - 1)]


def response_logprobs(
    model: nn.Module,
    seqs: Sequences,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each response token under `model`, from one forward pass over the joined sequences.

    seqs: on the model's device; its input_ids, attention_mask and position_ids [B, L] go through the model, and
    ``response_index()`` / ``response_tokens()`` [B, T] pick each response token's logits and id.
    Returns logprobs [B, T] float32 of log_softmax(logits / temperature), and with return_entropy also the entropy
    [B, T] float32 of that same distribution. Only the B*T needed rows of logits are upcast and normalised, never
    the whole [B, L, V].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    logits = model(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids, use_cache=False
    ).logits  # [B, L, V], model dtype
    picked = _gather_positions(logits, seqs.response_index()).float() / temperature  # [B, T, V]
    log_probs = torch.log_softmax(picked, dim=-1)
    tokens = seqs.response_tokens().to(logits.device).clamp(0, logits.shape[-1] - 1)
    token_logprobs = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    if not return_entropy:
        return token_logprobs
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logprobs, entropy


def chunk_logprobs(
    model: nn.Module, chunks: list[pa.RecordBatch], pad_token_id: int, temperature: float, device: torch.device
) -> pa.Array:
    """Per-token log-probs of every response, one forward pass per chunk on `device`, as one ``list<float32>``
    column (the reference's ``ref_logprobs``, the policy's ``old_logprobs``)."""
    parts = []
    for chunk in chunks:
        seqs = to_sequences(chunk, pad_token_id).to(device)
        lp = response_logprobs(model, seqs, temperature=temperature)
        parts.append(from_padded(lp.float().cpu(), seqs.response_lens.cpu()))
    return pa.concat_arrays(parts) if parts else pa.array([], S.PER_TOKEN)


def response_values(critic: nn.Module, seqs: Sequences) -> torch.Tensor:
    """Critic value of the state before each response token: ``seqs`` on the critic's device -> [B, T] float32."""
    values = critic(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids
    )  # [B, L]
    return _gather_positions(values, seqs.response_index()).float()


def _score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None)
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no `score` head; load reward models with "
            f"rlhf_dist.models.load.load_reward_model (AutoModelForSequenceClassification, num_labels=1)"
        )
    out_features = getattr(head, "out_features", 1)
    if out_features != 1:
        raise ValueError(
            f"{type(model).__name__}.score has {out_features} outputs; a reward model needs "
            f"num_labels=1 (load it with load_reward_model)"
        )
    return head


def sequence_scores(
    reward_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last_index: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward-model score of each sequence at its last real token: [B, L] inputs, last_index [B] -> [B] float32.

    The score head runs on the hidden state at `last_index` picked here, not through Hugging Face's own pooling,
    which finds the last token by searching for pad_token_id and so goes wrong when pad == eos and a response ends
    with eos. Works on a DeepSpeed-wrapped model (its `.module` is used; parameters are fetched by module hooks).
    """
    model = _unwrap(reward_model)
    head = _score_head(model)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, L, H]
    last_hidden = _gather_positions(hidden, last_index.reshape(-1, 1)).squeeze(1)  # [B, H]
    return head(last_hidden).squeeze(-1).float()
