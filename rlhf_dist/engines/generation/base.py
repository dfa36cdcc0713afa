"""The generation-engine interface: the rollout role holds one and never asks which."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch

from rlhf_dist.engines.weight_sync.buckets import Bucket, unpack_bucket


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    greedy: bool = False


@dataclass
class Generation:
    """One response per prompt, in prompt order. ``logprobs[i][t]`` is the log-prob of ``response_ids[i][t]`` under
    ``log_softmax(logits / temperature)`` (no top-k/top-p truncation), so it is comparable with the learner's."""

    response_ids: list[list[int]]
    logprobs: list[list[float]]


class GenerationEngine(ABC):
    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Generation: ...

    @abstractmethod
    def response_logprobs(self, batch: pa.RecordBatch, temperature: float) -> pa.Array:
        """Teacher-forced: the log-prob of each of ``batch``'s given responses under the engine's weights, one
        ``list<float32>`` per row (``Generation.logprobs``' meaning), as the learners compute theirs; raises
        NotImplementedError at a temperature the engine cannot score at (``GenerationConfig.scores_responses``)."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights, named as in the Hugging Face model, into the engine."""

    # One weight update, in the shape of vLLM's weight-transfer control plane: start, any number of receives, finish.
    # An engine without a transport of its own takes object-store buckets only.
    def init_weight_transfer(self, init_info: dict) -> None:
        if init_info:
            raise NotImplementedError(f"{type(self).__name__} takes weights through the object store only")

    def start_weight_update(self) -> None:
        self.wake_up()

    def receive_buckets(self, buckets: Iterable[Bucket]) -> None:
        for bucket in buckets:
            self.load_weights(unpack_bucket(bucket))

    def receive(self, update_info: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes weights through the object store only")

    def finish_weight_update(self) -> None:  # noqa: B027 (optional hook: nothing to finish by default)
        pass

    def sleep(self) -> None:  # noqa: B027 (optional hook)
        """Free memory between phases (colocated roles); a no-op where it means nothing."""

    def wake_up(self) -> None:  # noqa: B027 (optional hook)
        """Reclaim what ``sleep`` freed."""

    @abstractmethod
    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine's current weights, for checks that a sync really arrived."""
