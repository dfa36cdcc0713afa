"""The policy learner with its own rollout engine in the same process (veRL's hybrid engine, OpenRLHF's colocated
actor): one actor per device that trains and generates by turns, and weights that go from the training engine to
the generation engine in memory, without the object store or a transfer group.

``generation.hybrid_engine=true`` starts these in place of separate policy and rollout actors; the driver sees the
same two roles (``rollout`` is a second name for the same actors, ``orchestration/launch.py``), so the loop is the
same in every layout.
"""

from __future__ import annotations

import pyarrow as pa

from rlhf_dist.workers.policy import PolicyWorker
from rlhf_dist.workers.rollout import RolloutWorker


class HybridPolicyWorker(PolicyWorker):
    # what the driver calls on the "rollout" role of a hybrid actor (their compute is reported under that role)
    ROLLOUT_METHODS = ("generate", "get_version", "sleep", "wake_up", "weights")

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.rollout = RolloutWorker(cfg, rank, world_size)

    def generate(self, prompts: pa.RecordBatch, iteration: int, **kwargs) -> pa.RecordBatch:
        return self.rollout.generate(prompts, iteration, **kwargs)

    def get_version(self) -> int:
        return self.rollout.version

    def sleep(self) -> None:
        self.rollout.sleep()

    def wake_up(self) -> None:
        self.rollout.wake_up()

    def weights(self, names: list[str] | None = None) -> dict:
        return self.rollout.weights(names)

    def init_weight_sync(self, *args, **kwargs) -> None:
        """Nothing to connect: the engine is in this process."""

    def push_weights(self, version: int) -> tuple[list[int], int]:
        """Collective over the learners (every rank gathers the full weights under ZeRO-3); each rank loads them
        into its own engine. Returns ([version], bytes loaded) from every rank."""
        nbytes = 0

        def counted():
            nonlocal nbytes
            for name, tensor in self.engine.named_full_parameters(rank0_only=False):
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        engine = self.rollout.engine
        engine.start_weight_update()  # wakes a sleeping engine
        engine.load_weights(counted())
        engine.finish_weight_update()
        self.rollout.version = version
        return [version], nbytes
