"""The reward model as a Ray Serve deployment (``reward.serve``): the replica class, and the client the reward role
calls it through (a DeploymentHandle: in-cluster calls, no HTTP).

A replica scores the rollout's own token ids with the code the reward role runs in its process (``to_sequences`` +
``sequence_scores``), so a served run and an in-actor run give the same rewards. The driver side (deploy, reuse,
delete) is ``rlhf_dist/orchestration/reward_serve.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlhf_dist.config import ConfigError
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import split_balanced, to_sequences
from rlhf_dist.models.logprobs import sequence_scores


def import_serve():
    """``ray.serve``, or a one-line error naming the extra (``ray[serve]`` pulls in more than ``ray`` alone)."""
    try:
        from ray import serve  # deferred: serve
    except ImportError as err:
        missing = f"no module {err.name!r}" if err.name else str(err).splitlines()[0]
        raise ConfigError(
            "reward.serve.enabled", f"true, but Ray Serve does not import ({missing}); pip install 'rlhf_dist[serve]'"
        ) from None
    return serve


class RewardModelServer:
    """One replica: the reward model in ``model_dir`` on the replica's device. ``score`` takes a record batch with
    ``prompt_ids`` and ``response_ids`` and returns one float32 score per row ([batch])."""

    def __init__(self, model_dir: str, dtype: str, pad_token_id: int, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        self.model_dir, self.dtype, self.pad_token_id = str(Path(model_dir).resolve()), dtype, pad_token_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from rlhf_dist.models.load import load_reward_model  # deferred: transformers

        self.model = load_reward_model(model_dir, dtype=dtype).to(self.device).eval()
        # Serve runs sync methods on a thread pool: one forward pass at a time keeps a replica to its num_cpus
        self.lock = threading.Lock()

    @torch.no_grad()
    def score(self, batch: pa.RecordBatch) -> np.ndarray:
        seqs = to_sequences(batch, self.pad_token_id).to(self.device)
        with self.lock:
            scores = sequence_scores(self.model, seqs.input_ids, seqs.attention_mask, seqs.last_token_index())
        return scores.float().cpu().numpy()

    def describe(self) -> dict:
        """What a job compares before it shares a running deployment."""
        return {"model": self.model_dir, "dtype": self.dtype}


class ServedRewardError(RuntimeError):
    """The served reward model is missing or did not answer; the message is one line."""


class ServedReward:
    """The reward role's side: a shard goes out as requests of about ``batch_size`` rows, all at once (balanced by
    tokens), so the replicas share it; the scores come back in the shard's order."""

    def __init__(self, name: str, batch_size: int, timeout_s: float):
        serve = import_serve()
        self.name, self.batch_size, self.timeout_s = name, batch_size, timeout_s
        try:
            self.handle = serve.get_app_handle(name)
        except Exception as err:  # noqa: BLE001 - Serve raises several types for "not there"
            raise ServedRewardError(
                f"reward.serve.name={name!r}: no such Serve application on this cluster ({_first_line(err)}); the job "
                "deploys it before the roles start, or start one with `rlhf-dist serve-reward CONFIG`"
            ) from None

    def score(self, batch: pa.RecordBatch) -> np.ndarray:
        """One float32 score per row of ``batch`` (which must hold ``prompt_ids`` and ``response_ids``)."""
        if batch.num_rows == 0:
            return np.zeros(0, np.float32)
        ids = batch.select([S.PROMPT_IDS, S.RESPONSE_IDS])
        parts, index = split_balanced(ids, -(-ids.num_rows // self.batch_size))  # compact copies, not slices
        calls = [self.handle.score.remote(part) for part in parts]
        out = np.empty(ids.num_rows, np.float32)
        for call, idx in zip(calls, index):
            try:
                out[idx] = call.result(timeout_s=self.timeout_s)
            except TimeoutError:
                raise ServedRewardError(
                    f"reward.serve.name={self.name!r}: no scores within reward.serve.timeout_s={self.timeout_s:g} s "
                    "for a request; are its replicas placed (`serve status`)? raise the timeout or add replicas"
                ) from None
        return out


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
