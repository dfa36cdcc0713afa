"""`rlhf-dist plan CONFIG`: where every actor would go, on the live cluster or on a described one, without starting
anything."""

from __future__ import annotations

import argparse

from rlhf_dist.config import load_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, help="describe the cluster instead of asking ray.address: node count")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=float, default=96)


def run(args: argparse.Namespace) -> int:
    import ray  # deferred: cli

    from rlhf_dist.orchestration.placement import (  # deferred: cli
        assign,
        check_fits,
        format_placement,
        nodes_from_ray,
        plan,
        simulated_nodes,
    )

    cfg = load_config(args.config, args.overrides)
    plans = plan(cfg)
    if args.nodes:
        nodes = simulated_nodes(args.nodes, args.cpus_per_node, args.gpus_per_node)
        where = f"{args.nodes} node(s) x {args.gpus_per_node} GPU, {args.cpus_per_node:g} CPU"
    else:
        ray.init(address=cfg.ray.address or "auto")
        try:
            nodes = nodes_from_ray()
        finally:
            ray.shutdown()
        where = f"the cluster at {cfg.ray.address or 'auto'} ({len(nodes)} node(s))"
    check_fits(plans, {"CPU": sum(n.cpus for n in nodes), "GPU": sum(n.gpus for n in nodes)})
    print(f"placement of {args.config} on {where}:")
    print(format_placement(assign(plans, nodes)))
    return 0
