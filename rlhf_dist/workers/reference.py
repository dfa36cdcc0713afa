"""The reference role: the frozen starting policy, scoring each response token's log-prob for the KL leash."""
from __future__ import annotations

import pyarrow as pa
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import from_padded, make_batch, to_padded, to_sequences
from rlhf_dist.models.load import load_causal_lm, load_tokenizer
from rlhf_dist.models.logprobs import response_logprobs
from rlhf_dist.workers.common import derive_seed, device, setup_process


def chunk_logprobs(model, chunks: list[pa.RecordBatch], pad_token_id: int, temperature: float) -> pa.Array:
    """Per-token log-probs of every response, one forward pass per chunk, as one ``list<float32>`` column."""
    dev = device()
    parts = []
    for chunk in chunks:
        seqs = to_sequences(chunk, pad_token_id)
        response_ids, _ = to_padded(chunk, S.RESPONSE_IDS, pad_value=pad_token_id)
        lp = response_logprobs(
            model,
            seqs.input_ids.to(dev),
            seqs.attention_mask.to(dev),
            seqs.position_ids.to(dev),
            seqs.response_index().to(dev),
            response_ids.to(dev),
            temperature=temperature,
        )
        parts.append(from_padded(lp.float().cpu(), seqs.response_lens))
    return pa.concat_arrays(parts) if parts else pa.array([], S.PER_TOKEN)


class ReferenceWorker:
    def __init__(self, cfg, rank: int = 0):
        setup_process(derive_seed(cfg.seed, 3, rank), cfg.roles.reference.num_cpus)
        self.cfg = cfg
        path = cfg.model.reference or cfg.model.policy
        self.model = load_causal_lm(path, dtype=cfg.model.dtype, device=device()).eval()
        self.model.requires_grad_(False)
        self.pad_token_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy).pad_token_id

    @torch.no_grad()
    def logprobs(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        step = self.cfg.train.micro_batch_size or max(1, len(batch))
        chunks = [batch.slice(s, step) for s in range(0, len(batch), step)]
        lp = chunk_logprobs(self.model, chunks, self.pad_token_id, self.cfg.generation.temperature)
        return make_batch({S.REF_LOGPROBS: lp})
