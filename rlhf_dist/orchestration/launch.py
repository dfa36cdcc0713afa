"""Start every role's actors from the plan, and wire the learners' process groups."""

from __future__ import annotations

from contextlib import contextmanager

import ray
from ray.util.placement_group import remove_placement_group

from rlhf_dist.config import ROLE_TABLE, RunConfig, resolve_function
from rlhf_dist.orchestration.learner_groups import form_learner_groups, start_group
from rlhf_dist.orchestration.placement import (
    assign,
    bundles_by_owner,
    check_fits,
    format_placement,
    nodes_from_ray,
    plan,
)
from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, reserve

HYBRID_WORKER = "rlhf_dist.workers.hybrid:HybridPolicyWorker"  # generation.hybrid_engine: policy and rollout in one


@contextmanager
def running_roles(cfg: RunConfig):
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
    for g in (g for g in groups.values() if g.view_of is None):
        for actor in g.actors:
            ray.kill(actor)
    for pg in pgs.values():
        remove_placement_group(pg)


def engines_start_first(cfg: RunConfig) -> bool:
    """vLLM sizes its KV cache from the memory it finds free while it starts, and sleep mode's engines must be asleep
    before the learners take that memory; Hugging Face engines need neither, so with them every role starts at once
    (the rollout's start-up, mostly imports, then runs beside the others' instead of before them)."""
    return cfg.generation.engine == "vllm" or cfg.generation.enable_sleep


def wait_for_engines(cfg: RunConfig, rollout: RoleGroup) -> None:
    """Returns when every rollout engine is up (a method call runs only after the constructor), and asleep when
    sleep mode is on: the roles that share its GPUs start only now, into the memory it left (and freed)."""
    rollout.call("get_version").get()
    if cfg.generation.enable_sleep:
        rollout.call("sleep").get()


def launch_roles(cfg: RunConfig, started: dict[str, RoleGroup] | None = None) -> dict[str, RoleGroup]:
    """Reserve placement groups, then start each role in ROLE_TABLE's order (the rollout engines up before the rest
    where ``engines_start_first``; each learner role forms its data-parallel group); ``started`` is filled as groups
    come up, so a caller can stop them after an error."""
    plans = plan(cfg)
    check_fits(plans, ray.cluster_resources())
    print(
        "placement (expected; Ray decides the final node of each bundle):\n"
        + format_placement(assign(plans, nodes_from_ray())),
        flush=True,
    )
    pgs = {
        owner: reserve(
            owner, n, bundle["CPU"], bundle.get("GPU", 0.0), plans[owner].placement.upper(), cfg.ray.actor_timeout_s
        )
        for owner, (n, bundle) in bundles_by_owner(plans).items()
    }
    groups: dict[str, RoleGroup] = {} if started is None else started
    for spec in ROLE_TABLE:
        if spec.name not in plans:
            continue
        p = plans[spec.name]
        owner_n = plans[p.bundle_owner].num_actors
        bundles = Bundles(pgs[p.bundle_owner], [i % owner_n for i in range(p.num_actors)], p.num_cpus, p.num_gpus)
        worker = HYBRID_WORKER if spec.name == "policy" and cfg.generation.hybrid_engine else spec.worker
        role_cls = resolve_function(f"ROLE_TABLE[{spec.name}]", worker)
        restarts = 0 if spec.learner else cfg.ray.max_actor_restarts  # a learner's state dies with it
        groups[spec.name] = start_group(spec.name, role_cls, cfg, bundles, max_restarts=restarts)
        if spec.name == "rollout" and engines_start_first(cfg):
            wait_for_engines(cfg, groups[spec.name])
        if worker == HYBRID_WORKER:  # the same actors play the rollout role too
            groups["rollout"] = groups[spec.name].view("rollout", role_cls.ROLLOUT_METHODS)
    # once every actor is on its way: their constructors run side by side, then the learner groups form together
    form_learner_groups([groups[spec.name] for spec in ROLE_TABLE if spec.learner and spec.name in groups])
    for group in groups.values():  # the process ids a restart is told apart by
        if group.max_restarts:
            group.ping()
    return groups
