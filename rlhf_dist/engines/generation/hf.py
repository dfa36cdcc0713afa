"""Hugging Face ``generate`` as a generation engine: the portable one (CPU, or one GPU without vLLM)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import pyarrow as pa
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf_dist.engines.generation.base import Generation, GenerationEngine, SamplingConfig
from rlhf_dist.engines.generation.static_decode import decode
from rlhf_dist.models.logprobs import chunk_logprobs


class _LogprobRecorder(LogitsProcessor):
    """First in the processor list, so it sees the raw logits. It keeps one step's ``log_softmax(logits / T)``,
    ``[B, V]``, and takes from it the chosen token's log-prob once the next call (or ``finish``) shows that token."""

    def __init__(self, temperature: float, prompt_len: int):
        self.temperature, self.prompt_len = temperature, prompt_len
        self.pending: torch.Tensor | None = None  # [B, V], the last step's log-probs
        self.chosen: list[torch.Tensor] = []  # one [B] per response position

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids)
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, ids: torch.Tensor) -> None:
        # Position-based, so a step that generate computes and then undoes (deferred stop checks) is never recorded.
        pos = self.prompt_len + len(self.chosen)
        if self.pending is not None and ids.shape[1] > pos:
            self.chosen.append(self.pending.gather(-1, ids[:, pos : pos + 1]).squeeze(-1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Log-probs of ``sequences[:, prompt_len:]``, ``[B, steps]``."""
        self._take(sequences)
        self.pending = None
        steps = sequences.shape[1] - self.prompt_len
        if len(self.chosen) != steps:
            raise RuntimeError(
                f"recorded {len(self.chosen)} log-probs for {steps} generated tokens; has transformers "
                f"changed when it calls logits processors?"
            )
        return torch.stack(self.chosen, dim=1) if steps else sequences.new_zeros((len(sequences), 0), dtype=torch.float)


COMPILED_WIDTH_STEP = 16  # compiled generation pads prompts to a multiple of this: a few shapes, a few compiles


class HFGenerationEngine(GenerationEngine):
    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        eos_token_id: int | list[int],
        batch_size: int = 64,
        compile: bool = False,
    ):
        self.model = model.eval()
        # compiled decoding (static_decode.py): the forward compiled for the one-token steps over a static KV cache
        # (fixed shapes). Only generate runs it: scoring (response_logprobs) keeps the eager forward the learners use.
        # The parameters are inputs of the graph (torch.compile reads module parameters at each call), so weights
        # loaded in place are used without a recompile.
        self._compiled_forward = torch.compile(model.forward, fullgraph=True, dynamic=False) if compile else None
        # generate() fills every field we leave None from model.generation_config (the checkpoint's
        # generation_config.json); a blank one keeps its repetition penalties, suppressed tokens etc. out.
        self.model.generation_config = GenerationConfig()
        self.pad_token_id = pad_token_id
        self.eos_token_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.batch_size = batch_size
        self._reported: set[SamplingConfig] = set()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def effective_sampling(self, sampling: SamplingConfig) -> dict:
        """What shapes sampling besides the model, and the temperature of the reported log-probs; nothing else runs."""
        return {
            "do_sample": _do_sample(sampling),
            "temperature": _logprob_temperature(sampling),
            "top_k": sampling.top_k if _do_sample(sampling) else 0,
            "top_p": sampling.top_p if _do_sample(sampling) else 1.0,
            "repetition_penalty": 1.0,
            "processors": [type(p).__name__ for p in _warpers(sampling)],
        }

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation:
        key = replace(sampling, seed=0)
        if key not in self._reported:
            self._reported.add(key)
            # Printed, not logged: nothing configures logging at INFO, and this is what the rollout log-probs mean.
            print(
                f"HF generation: log-probs are log_softmax(logits / temperature); sampling applies "
                f"{self.effective_sampling(sampling)}",
                flush=True,
            )
        # One seed per call makes a run repeatable; the caller derives it from the run seed, iteration and rank.
        torch.manual_seed(sampling.seed)
        out = Generation(response_ids=[], logprobs=[])
        for start in range(0, len(prompts), self.batch_size):
            part = self._generate_batch(prompts[start : start + self.batch_size], sampling)
            out.response_ids += part.response_ids
            out.logprobs += part.logprobs
        return out

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        # Every field that can change the distribution is pinned to "off"; our warpers run after the recorder instead.
        # transformers warns about sampling fields set for greedy decoding, where it builds no warpers anyway.
        warpers_off = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        return GenerationConfig(
            do_sample=_do_sample(sampling),
            max_new_tokens=sampling.max_new_tokens,
            min_length=0,
            num_beams=1,
            num_return_sequences=1,
            **(warpers_off if _do_sample(sampling) else {}),
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            remove_invalid_values=False,
            renormalize_logits=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=False,
            output_scores=False,
        )

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; drop empty prompts before generation")
        width = max(len(p) for p in prompts)
        if self._compiled_forward is not None:
            width = -(-width // COMPILED_WIDTH_STEP) * COMPILED_WIDTH_STEP
        # Left padding keeps every prompt's last token at the same position, which batched decoding needs.
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        if self._compiled_forward is not None:
            new_tokens, logprobs = (
                t.cpu()
                for t in decode(
                    self.model,
                    self._compiled_forward,
                    ids.to(self.device),
                    attn.to(self.device),
                    sampling.max_new_tokens,
                    _logprob_temperature(sampling),
                    _warpers(sampling),
                    not _do_sample(sampling),
                    self.eos_token_ids,
                    self.pad_token_id,
                )
            )
        else:
            recorder = _LogprobRecorder(_logprob_temperature(sampling), width)
            res = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                generation_config=self._generation_config(sampling),
                logits_processor=LogitsProcessorList([recorder, *_warpers(sampling)]),
            )
            new_tokens = res.sequences[:, width:].cpu()  # [B, steps]
            logprobs = recorder.finish(res.sequences).cpu()  # [B, steps]
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
    def response_logprobs(self, batch: pa.RecordBatch, temperature: float) -> pa.Array:
        # the learners' own function on the engine's model: a difference can only come from the weights
        chunks = [batch.slice(start, self.batch_size) for start in range(0, len(batch), self.batch_size)]
        return chunk_logprobs(self.model, chunks, self.pad_token_id, temperature, self.device)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(
                    f"weight {name!r} has no parameter in the rollout model; were the two built from the same config?"
                )
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.model.named_parameters())


def _do_sample(sampling: SamplingConfig) -> bool:
    return not (sampling.greedy or sampling.temperature == 0)


def _logprob_temperature(sampling: SamplingConfig) -> float:
    return sampling.temperature if sampling.temperature > 0 else 1.0


def _warpers(sampling: SamplingConfig) -> list[LogitsProcessor]:
    """The sampling warpers, in the order transformers itself applies them."""
    if not _do_sample(sampling):
        return []
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
