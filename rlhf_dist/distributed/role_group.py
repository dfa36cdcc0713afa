"""N Ray actors of one role: create them in a placement group, call a method on all, scatter and gather batches.

The roles themselves are plain classes; this is the only place that turns them into actors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_in_order, split_balanced


class ActorTimeoutError(RuntimeError):
    pass


class ActorDiedError(RuntimeError):
    pass


@dataclass
class Bundles:
    """A placement group and, for each actor of a role, the bundle it sits in and the share of it that it takes."""

    pg: PlacementGroup
    indices: list[int]
    num_cpus: float
    num_gpus: float


def reserve(name: str, n: int, num_cpus: float, num_gpus: float, strategy: str, timeout_s: float) -> PlacementGroup:
    """One bundle per actor; PACK keeps a role on as few nodes as possible, SPREAD puts actors on different nodes."""
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=f"rlhf_dist:{name}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ActorTimeoutError(
            f"role {name}: {n} bundle(s) of {bundle} ({strategy}) could not be placed within {timeout_s:.0f} s; "
            f"the cluster has {ray.cluster_resources()}: lower roles.{name}.num_actors / num_cpus / num_gpus"
        )
    return pg


class RoleGroup:
    """The actors of one role, with a timeout on every wait that names the actor that did not answer."""

    def __init__(
        self,
        name: str,
        role_cls: type,
        bundles: Bundles,
        make_args: Callable[[int], tuple[tuple, dict]],
        timeout_s: float,
        env_vars: dict[str, str] | None = None,
    ):
        self.name = name
        self.timeout_s = timeout_s
        remote_cls = ray.remote(role_cls)
        self.actors = []
        for rank, bundle_index in enumerate(bundles.indices):
            args, kwargs = make_args(rank)
            self.actors.append(
                remote_cls.options(
                    num_cpus=bundles.num_cpus,
                    num_gpus=bundles.num_gpus,
                    name=None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=bundles.pg, placement_group_bundle_index=bundle_index
                    ),
                    runtime_env={"env_vars": dict(env_vars or {})},
                ).remote(*args, **kwargs)
            )

    def __len__(self) -> int:
        return len(self.actors)

    # -- calls -------------------------------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> "Pending":
        """The same call on every actor, all in flight at once."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return Pending(self, method, refs)

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> "Pending":
        return Pending(self, method, [getattr(self.actors[rank], method).remote(*args, **kwargs)], ranks=[rank])

    def scatter(self, method: str, batch: pa.RecordBatch, *args: Any, **kwargs: Any) -> "Pending":
        """Split ``batch`` into one token-balanced shard per actor; ``Pending.batch()`` gathers in the original order."""
        # Before generation only prompts count; after it, prompts and responses.
        columns = tuple(c for c in (S.PROMPT_IDS, S.RESPONSE_IDS) if c in batch.schema.names)
        shards, index = split_balanced(batch, len(self.actors), token_columns=columns)
        refs = [getattr(a, method).remote(ray.put(s), *args, **kwargs) for a, s in zip(self.actors, shards)]
        return Pending(self, method, refs, index=index)


class Pending:
    """Calls in flight on a group; waiting is bounded by the group's timeout."""

    def __init__(self, group: RoleGroup, method: str, refs: list, index=None, ranks: Sequence[int] | None = None):
        self.group, self.method, self.refs, self.index = group, method, refs, index
        self.ranks = list(ranks) if ranks is not None else list(range(len(refs)))

    def get(self) -> list:
        deadline = time.monotonic() + self.group.timeout_s
        pending = list(self.refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not done and pending:
                late = [self.ranks[self.refs.index(r)] for r in pending]
                raise ActorTimeoutError(
                    f"role {self.group.name}: actor(s) {late} did not answer {self.method}() within "
                    f"{self.group.timeout_s:.0f} s (ray.actor_timeout_s); see their logs above"
                )
            for ref in done:  # surface a dead actor as soon as it is known, not after the others finish
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                    rank = self.ranks[self.refs.index(ref)]
                    raise ActorDiedError(
                        f"role {self.group.name} actor {rank} failed in {self.method}(): {err}"
                    ) from err
        return ray.get(self.refs)

    def batch(self) -> pa.RecordBatch:
        parts = self.get()
        return concat_in_order(parts, self.index) if self.index is not None else parts[0]
