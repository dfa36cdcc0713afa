"""Start every role's actors from the plan, and wire the learners' process groups."""
from __future__ import annotations

from contextlib import contextmanager

import ray
from ray.util.placement_group import remove_placement_group

from rlhf_dist.orchestration.cluster import worker_env
from rlhf_dist.orchestration.placement import (
    ROLES,
    assign,
    bundles_by_owner,
    check_fits,
    format_placement,
    nodes_from_ray,
    plan,
)
from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, reserve
from rlhf_dist.workers.critic import CriticWorker
from rlhf_dist.workers.policy import PolicyWorker
from rlhf_dist.workers.reference import ReferenceWorker
from rlhf_dist.workers.reward import RewardWorker
from rlhf_dist.workers.rollout import RolloutWorker

LEARNERS = ("policy", "critic")


def role_classes() -> dict[str, type]:
    return {
        "rollout": RolloutWorker,
        "reward": RewardWorker,
        "reference": ReferenceWorker,
        "policy": PolicyWorker,
        "critic": CriticWorker,
    }


@contextmanager
def running_roles(cfg):
    """``launch_roles`` whose actors and placement groups are gone afterwards, also after an error, so one Ray
    session can run several jobs (tests, the pipeline) one after another."""
    groups: dict[str, RoleGroup] = {}
    try:
        groups = launch_roles(cfg, started=groups)
        yield groups
    finally:
        stop_roles(groups)


def stop_roles(groups: dict[str, RoleGroup]) -> None:
    pgs = {id(g.bundles.pg): g.bundles.pg for g in groups.values()}
    for g in groups.values():
        for actor in g.actors:
            ray.kill(actor)
    for pg in pgs.values():
        remove_placement_group(pg)


def wait_for_engines(cfg, rollout: RoleGroup) -> None:
    """Returns when every rollout engine is up (a method call runs only after the constructor), and asleep when
    sleep mode is on. vLLM sizes its KV cache from the GPU memory it finds free while it starts, so roles that share
    its GPUs start only now, into the memory it left (and freed)."""
    rollout.call("get_version").get()
    if cfg.generation.enable_sleep:
        rollout.call("sleep").get()


def launch_roles(cfg, started: dict[str, RoleGroup] | None = None) -> dict[str, RoleGroup]:
    """Reserve placement groups, start the actors, and form each learner role's data-parallel group."""
    plans = plan(cfg)
    check_fits(plans, ray.cluster_resources())
    print("placement (expected; Ray decides the final node of each bundle):\n" + format_placement(assign(plans, nodes_from_ray())), flush=True)
    timeout = cfg.ray.actor_timeout_s
    pgs = {
        owner: reserve(owner, n, bundle["CPU"], bundle.get("GPU", 0.0), plans[owner].placement.upper(), timeout)
        for owner, (n, bundle) in bundles_by_owner(plans).items()
    }
    classes = role_classes()
    groups: dict[str, RoleGroup] = {} if started is None else started
    for role in ROLES:  # rollout first
        if role not in plans:
            continue
        p = plans[role]
        owner_n = plans[p.bundle_owner].num_actors
        bundles = Bundles(pgs[p.bundle_owner], [i % owner_n for i in range(p.num_actors)], p.num_cpus, p.num_gpus)
        if role in LEARNERS:
            make_args = lambda rank, n=p.num_actors: ((cfg, rank, n), {})
        else:
            make_args = lambda rank: ((cfg, rank), {})
        groups[role] = RoleGroup(role, classes[role], bundles, make_args, timeout, env_vars=worker_env())
        if role == "rollout":
            wait_for_engines(cfg, groups[role])
    for role in LEARNERS:
        if role in groups:
            addr, port = groups[role].call_rank(0, "rendezvous_address").get()[0]
            groups[role].call("init_group", addr, port).get()
    return groups
