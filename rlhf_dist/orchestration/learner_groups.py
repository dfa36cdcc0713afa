"""N actors of any role class, sized by one `RoleConfig`, started and stopped around one stage.

`launch_roles` (launch.py) plans the five PPO roles from `cfg.roles`; the other stages (SFT, reward model, DPO,
preference collection, evaluation) each need a group or two for a while, then give the CPUs and GPUs back so the
next stage, in the same Ray session, can have them. Hence context managers that always release what they took:

    with learner_group("sft", SFTLearner, cfg, cfg.sft.learners) as sft:   # one ZeRO data-parallel group
        sft.scatter("train", batch).get()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from rlhf_dist.config import RoleConfig, RunConfig
from rlhf_dist.orchestration.cluster import worker_env
from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, reserve


def start_group(name: str, role_cls: type, cfg: RunConfig, bundles: Bundles, max_restarts: int = 0) -> RoleGroup:
    """The one way a group starts: every role is built as ``role_cls(cfg, rank, world_size)``."""
    n = len(bundles.indices)
    return RoleGroup(
        name,
        role_cls,
        bundles,
        lambda rank: ((cfg, rank, n), {}),
        cfg.ray.actor_timeout_s,
        env_vars=worker_env(),
        max_restarts=max_restarts,
    )


def form_learner_groups(groups: list[RoleGroup]) -> None:
    """Rank 0's address to every rank of each group: one data-parallel process group per group (gloo on CPU, NCCL on
    GPU); each rank then builds its training engine. The groups form side by side (policy and critic are separate
    processes with separate rendezvous)."""
    addresses = [group.call_rank(0, "rendezvous_address") for group in groups]
    formed = [group.call("init_group", *address.get()[0]) for group, address in zip(groups, addresses)]
    for pending in formed:
        pending.get()


@contextmanager
def role_group(name: str, role_cls: type, cfg: RunConfig, role: RoleConfig, learner: bool) -> Iterator[RoleGroup]:
    """`role.num_actors` actors of `role_cls` in their own placement group; killed and released on exit."""
    pg = reserve(name, role.num_actors, role.num_cpus, role.num_gpus, role.placement.upper(), cfg.ray.actor_timeout_s)
    group = None
    try:
        group = start_group(
            name, role_cls, cfg, Bundles(pg, list(range(role.num_actors)), role.num_cpus, role.num_gpus)
        )
        if learner:
            form_learner_groups([group])
        yield group
    finally:
        for actor in group.actors if group is not None else ():
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)


def worker_group(name: str, role_cls: type, cfg: RunConfig, role: RoleConfig):
    """Rollout, reference, reward, labeller actors for a stage."""
    return role_group(name, role_cls, cfg, role, learner=False)


def learner_group(name: str, learner_cls: type, cfg: RunConfig, role: RoleConfig):
    """One data-parallel learner group for a stage, ready to train."""
    return role_group(name, learner_cls, cfg, role, learner=True)


def live_placement_groups() -> set[str]:
    """Ids (hex) of the session's placement groups that are not removed."""
    return {pg_id for pg_id, info in placement_group_table().items() if info.get("state") != "REMOVED"}


def release_placement_groups(keep: set[str]) -> int:
    """Remove every live placement group not in `keep` (with its actors); returns how many.

    A pipeline snapshots `live_placement_groups()` before a stage and releases the rest after it: a driver that
    leaves a reservation behind (`launch_roles` without `running_roles`) cannot starve the next stage.
    """
    extra = live_placement_groups() - keep
    for pg_id in extra:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return len(extra)
