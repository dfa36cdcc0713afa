"""A sampling loop over a static KV cache with the one-token forward compiled: the hf engine's ``generation.compile``.

transformers' own compiled ``generate`` spends more of a small model's time around the compiled step than in it (on
the tiny CPU model, 32 prompts x 16 tokens: attention masks, stopping criteria and the logits-processor calls took
about 15 ms of a 60 ms generate, the compiled steps 16). This loop keeps only what sampling needs: the full width of
the cache is the mask every step (one shape, one graph), and each token is ``torch.multinomial``'s draw, as in
``generate``, so the same seed draws the same tokens as the eager engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache
from transformers.generation.logits_process import LogitsProcessor


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    step: Callable,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    warpers: Sequence[LogitsProcessor],
    greedy: bool,
    eos_token_ids: set[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``ids`` ``[B, W]`` (``attention_mask`` 1 on tokens) -> ``(tokens, logprobs)``, each
    ``[B, steps]``: the prefill runs ``model`` eagerly, every later token ``step`` (the compiled forward) on one token
    a row. ``logprobs`` are ``log_softmax(logits / temperature)`` at the chosen tokens; ``warpers`` (top-k, top-p,
    the temperature) shape only the sampling. A row that drew an EOS gets the pad token after it; the loop stops
    once every row has one, or after ``max_new_tokens``."""
    batch, width = ids.shape
    if max_new_tokens <= 0:
        return ids.new_zeros((batch, 0)), torch.zeros((batch, 0))
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    # the whole cache's width every step: one shape for the compiled graph; causality hides the slots not yet written
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        cache_position=torch.arange(width, device=ids.device),
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    eos = torch.tensor(sorted(eos_token_ids), device=ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    next_position = positions[:, -1:] + 1
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        raw = logits.float()
        logp = torch.log_softmax(raw / temperature, dim=-1)
        if greedy:
            token = raw.argmax(dim=-1)
        else:  # generate's own steps: the warpers on the raw logits, then softmax and multinomial
            scores = raw
            for warp in warpers:
                scores = warp(None, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
        token = token.masked_fill(done, pad_token_id)
        tokens.append(token)
        logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
        done |= torch.isin(token, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits = step(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position + t,
            past_key_values=cache,
            cache_position=torch.tensor([width + t], device=ids.device),
            use_cache=True,
        ).logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
