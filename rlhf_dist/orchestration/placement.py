"""From the config's ``roles`` section to placement groups: who runs where, checked against the cluster first."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from rlhf_dist.config import ROLE_TABLE, ConfigError

ROLES = tuple(r.name for r in ROLE_TABLE)


@dataclass
class RolePlan:
    role: str
    num_actors: int
    num_cpus: float  # per actor, what the actor itself asks of its bundle
    num_gpus: float  # per actor: Ray's (fractional) request inside its bundle
    bundle_owner: str  # the role whose placement group holds this role's actors (its anchor)
    placement: str
    bundle_gpus: float = 0.0  # GPUs of each of the owner's bundles


# Ray keeps resource amounts in units of 1e-4 and a request above 1 GPU must be whole.
_GPU_UNIT = 10_000


def _share(gpus: float, actors: int) -> float:
    """One actor's request when ``actors`` share ``gpus``, rounded down to what Ray can represent."""
    each = gpus / actors
    return float(int(each)) if each >= 1 else int(each * _GPU_UNIT) / _GPU_UNIT


def actors_per_bundle(counts: list[int], owner_n: int) -> list[int]:
    """Actors on each of the owner's bundles: actor ``i`` of every sharing role sits in bundle ``i % owner_n``."""
    per = [0] * owner_n
    for n in counts:
        for i in range(n):
            per[i % owner_n] += 1
    return per


def plan(cfg) -> dict[str, RolePlan]:
    """Roles that share GPUs (``colocate_with``, followed to the anchor) sit in the anchor's bundles: each actor brings
    its own CPUs, and the actors on one bundle split its GPUs (the anchor's num_gpus) so that their requests add up to
    exactly the bundle's (the busiest bundle's, where counts differ). Ray needs a fraction; the memory split is the
    engines' business: vLLM's gpu_memory_utilization and sleep mode."""
    hybrid = cfg.generation.hybrid_engine  # the engines live in the policy's actors: no rollout actors of their own
    roles = {r: cfg.roles.get(r) for r in ROLES if cfg.roles.get(r).num_actors > 0 and not (hybrid and r == "rollout")}
    owner_of = {name: cfg.roles.anchor(name) for name in roles}
    plans = {}
    for name, rc in roles.items():
        owner = owner_of[name]
        owner_rc = roles[owner]
        sharing = [roles[r].num_actors for r in roles if owner_of[r] == owner]
        busiest = max(actors_per_bundle(sharing, owner_rc.num_actors))
        each = _share(owner_rc.num_gpus, busiest)
        if name == owner:  # the owner has one actor per bundle: it takes the rounding remainder
            each = round(owner_rc.num_gpus - (busiest - 1) * each, 4)
        plans[name] = RolePlan(
            role=name,
            num_actors=rc.num_actors,
            num_cpus=rc.num_cpus,
            num_gpus=each,
            bundle_owner=owner,
            placement=owner_rc.placement,
            bundle_gpus=owner_rc.num_gpus,
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
    """One bundle of ``owner``'s group: the CPUs of every actor on the busiest bundle, and the owner's GPUs."""
    n = plans[owner].num_actors
    cpus = [0.0] * n
    for p in plans.values():
        if p.bundle_owner == owner:
            for i in range(p.num_actors):
                cpus[i % n] += p.num_cpus
    gpus = plans[owner].bundle_gpus
    return {"CPU": max(cpus), "GPU": gpus} if gpus else {"CPU": max(cpus)}


def bundles_by_owner(plans: dict[str, RolePlan]) -> dict[str, tuple[int, dict[str, float]]]:
    owners = [r for r in ROLES if r in plans and plans[r].bundle_owner == r]
    return {owner: (plans[owner].num_actors, _bundle(plans, owner)) for owner in owners}


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


# -- per node: which role lands where ------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    cpus: float
    gpus: int
    free_cpus: float = -1.0
    free_gpus: list[int] | None = None

    def __post_init__(self):
        self.free_cpus = self.cpus if self.free_cpus < 0 else self.free_cpus
        self.free_gpus = list(range(int(self.gpus))) if self.free_gpus is None else self.free_gpus

    def fits(self, bundle: dict[str, float]) -> bool:
        return self.free_cpus + 1e-9 >= bundle["CPU"] and len(self.free_gpus) >= bundle.get("GPU", 0)


@dataclass
class Slot:
    role: str
    rank: int
    node: str
    cpus: float
    gpus: list[int]


def nodes_from_ray() -> list[Node]:
    return [
        Node(n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0), int(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n["Alive"]
    ]


def simulated_nodes(count: int, cpus: float, gpus: int) -> list[Node]:
    return [Node(f"node{i}", cpus, gpus) for i in range(count)]


def assign(plans: dict[str, RolePlan], nodes: list[Node]) -> list[Slot]:
    """Where each actor goes, bundle by bundle, the way Ray's PACK / SPREAD strategies place them (best effort:
    PACK fills the node it is on before opening another; SPREAD takes the node holding fewest of the group).

    Fails with one message, per node, when a bundle fits nowhere.
    """
    slots: list[Slot] = []
    for owner, (n, bundle) in bundles_by_owner(plans).items():
        used: dict[str, int] = {}
        last: Node | None = None
        for rank in range(n):
            candidates = [x for x in nodes if x.fits(bundle)]
            if not candidates:
                raise ResourceError(_no_room(plans, owner, rank, bundle, nodes))
            if plans[owner].placement == "spread":
                node = min(candidates, key=lambda x: (used.get(x.name, 0), -len(x.free_gpus), -x.free_cpus))
            elif last is not None and last.fits(bundle):
                node = last
            else:
                node = max(candidates, key=lambda x: (len(x.free_gpus), x.free_cpus))
            gpus = [node.free_gpus.pop(0) for _ in range(int(bundle.get("GPU", 0)))]
            node.free_cpus -= bundle["CPU"]
            used[node.name] = used.get(node.name, 0) + 1
            last = node
            for p in plans.values():  # the owner and every role colocated on its bundles
                if p.bundle_owner == owner:
                    slots += [
                        Slot(p.role, r, node.name, p.num_cpus, gpus) for r in range(p.num_actors) if r % n == rank
                    ]
    return slots


def _no_room(plans, owner, rank, bundle, nodes) -> str:
    sharing = [p.role for p in plans.values() if p.bundle_owner == owner]
    free = "; ".join(f"{x.name}: {x.free_cpus:g}/{x.cpus:g} CPU, {len(x.free_gpus)}/{x.gpus} GPU free" for x in nodes)
    return (
        f"{'+'.join(sharing)} actor {rank} needs {bundle['CPU']:g} CPU and {bundle.get('GPU', 0):g} GPU on one "
        f"node, and no node has that left after placing the roles before it ({free}); lower roles.{owner}.num_actors "
        f"/ num_gpus / num_cpus, colocate roles, or add nodes"
    )


def format_placement(slots: list[Slot]) -> str:
    rows = [("role", "actor", "node", "CPUs", "GPUs")]
    rows += [(s.role, str(s.rank), s.node, f"{s.cpus:g}", ",".join(map(str, s.gpus)) or "-") for s in slots]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


class ResourceError(ConfigError):
    """The plan does not fit the cluster: a config problem, reported in one line before any actor starts."""

    def __init__(self, message: str):
        super().__init__("roles", message)
