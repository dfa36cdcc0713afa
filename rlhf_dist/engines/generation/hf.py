"""Hugging Face ``generate`` as a generation engine: the portable one (CPU, or one GPU without vLLM)."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from rlhf_dist.engines.generation.base import Generation, GenerationEngine, SamplingConfig


class HFGenerationEngine(GenerationEngine):
    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.eos_token_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation:
        # One seed per call makes a run repeatable; the caller derives it from the run seed, iteration and rank.
        torch.manual_seed(sampling.seed)
        out = Generation(response_ids=[], logprobs=[])
        for start in range(0, len(prompts), self.batch_size):
            part = self._generate_batch(prompts[start : start + self.batch_size], sampling)
            out.response_ids += part.response_ids
            out.logprobs += part.logprobs
        return out

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; drop empty prompts before generation")
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token at the same position, which batched decoding needs.
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        kwargs = dict(do_sample=False) if sampling.greedy or sampling.temperature == 0 else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None
        )
        res = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        new_tokens = res.sequences[:, width:].cpu()  # [B, steps]
        if new_tokens.shape[1] == 0:
            return Generation([[] for _ in prompts], [[] for _ in prompts])
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        logits = torch.stack(res.logits, dim=1).float().cpu()  # raw logits, [B, steps, V]
        logprobs = torch.log_softmax(logits / temperature, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        # A response ends at its first EOS (kept: the policy chose to stop); what follows is padding.
        is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
        for e in self.eos_token_ids:
            is_eos |= new_tokens == e
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        lengths = (~after_eos).sum(dim=1).tolist()
        tokens, lps = new_tokens.tolist(), logprobs.tolist()
        return Generation(
            response_ids=[row[:n] for row, n in zip(tokens, lengths)],
            logprobs=[row[:n] for row, n in zip(lps, lengths)],
        )

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"weight {name!r} has no parameter in the rollout model; were the two built from the same config?")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.model.named_parameters())
