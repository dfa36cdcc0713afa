"""From the config's ``roles`` section to placement groups: who runs where, checked against the cluster first."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

ROLES = ("rollout", "reward", "reference", "policy", "critic")


@dataclass
class RolePlan:
    role: str
    num_actors: int
    num_cpus: float  # per actor, what the actor itself asks of its bundle
    num_gpus: float
    bundle_owner: str  # the role whose placement group holds this role's actors
    placement: str


def plan(cfg) -> dict[str, RolePlan]:
    """Roles that share GPUs (``colocate_with``) sit in the owner's bundles and split them evenly."""
    roles = {r: getattr(cfg.roles, r) for r in ROLES if getattr(cfg.roles, r).num_actors > 0}
    sharers: dict[str, list[str]] = defaultdict(list)
    for name, rc in roles.items():
        sharers[rc.colocate_with or name].append(name)
    plans = {}
    for name, rc in roles.items():
        owner = rc.colocate_with or name
        share = len(sharers[owner])
        owner_rc = roles[owner]
        plans[name] = RolePlan(
            role=name,
            num_actors=rc.num_actors,
            num_cpus=owner_rc.num_cpus / share if share > 1 else rc.num_cpus,
            num_gpus=owner_rc.num_gpus / share if share > 1 else rc.num_gpus,
            bundle_owner=owner,
            placement=owner_rc.placement,
        )
    return plans


def required_resources(plans: dict[str, RolePlan]) -> dict[str, float]:
    need = {"CPU": 0.0, "GPU": 0.0}
    for p in plans.values():
        if p.bundle_owner == p.role:  # a colocated role adds nothing to its owner's bundles
            need["CPU"] += p.num_actors * _bundle(plans, p.role)["CPU"]
            need["GPU"] += p.num_actors * _bundle(plans, p.role).get("GPU", 0.0)
    return need


def _bundle(plans: dict[str, RolePlan], owner: str) -> dict[str, float]:
    cpus = sum(p.num_cpus for p in plans.values() if p.bundle_owner == owner)
    gpus = sum(p.num_gpus for p in plans.values() if p.bundle_owner == owner)
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def bundles_by_owner(plans: dict[str, RolePlan]) -> dict[str, tuple[int, dict[str, float]]]:
    return {
        owner: (plans[owner].num_actors, _bundle(plans, owner))
        for owner in {p.bundle_owner for p in plans.values()}
    }


def check_fits(plans: dict[str, RolePlan], total: dict[str, float]) -> None:
    """Fail before any actor starts when the plan asks for more than the cluster has."""
    need = required_resources(plans)
    short = [k for k in ("CPU", "GPU") if need[k] > total.get(k, 0.0) + 1e-9]
    if short:
        asked = ", ".join(
            f"{p.role}: {p.num_actors} x ({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for p in plans.values()
        )
        raise ResourceError(
            f"the run asks for {need['CPU']:g} CPU and {need['GPU']:g} GPU ({asked}); the cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower roles.*.num_actors / num_gpus "
            f"or add nodes"
        )


class ResourceError(RuntimeError):
    pass
