"""``make_train_engine``: the one place that names both backends, so the base module imports neither."""

from __future__ import annotations

from rlhf_dist.engines.training.base import ModelOrFactory, TrainEngine, TrainOptions
from rlhf_dist.engines.training.deepspeed_engine import DeepSpeedTrainEngine
from rlhf_dist.engines.training.torch_engine import TorchTrainEngine


def make_train_engine(
    kind: str, model: ModelOrFactory, options: TrainOptions, rank: int = 0, world_size: int = 1
) -> TrainEngine:
    """Build a training engine. ``kind``: "deepspeed" or "torch".

    With ``world_size > 1`` the caller must have joined the process group first
    (``rlhf_dist.comm.process_group.init_process_group``); with 1 the engine makes a local group if needed.
    """
    if kind == "deepspeed":
        return DeepSpeedTrainEngine(model, options, rank=rank, world_size=world_size)
    if kind == "torch":
        return TorchTrainEngine(model, options, rank=rank, world_size=world_size)
    raise ValueError(f"make_train_engine: kind={kind!r}; must be 'deepspeed' or 'torch'")
