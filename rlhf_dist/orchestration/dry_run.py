"""`rlhf-dist plan CONFIG`: where every actor would go, without starting anything.

It plans on one of three machines, and says which: `--nodes N` describes a cluster; `--address ADDR` joins that
running cluster (as a driver, for its node list only); with neither it plans on this machine as the embedded Ray
would size it (the CPUs `ray_session` gives it, the GPUs Ray would detect) and joins nothing, whatever `ray.address`
or RAY_ADDRESS say: a dry run does not connect to a cluster nobody named on its command line.
"""

from __future__ import annotations

import argparse
import os
import socket

from rlhf_dist.config import ConfigError, load_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, help="describe a cluster of this many nodes (see --gpus/cpus-per-node)")
    where.add_argument(
        "--address",
        metavar="ADDR",
        help="join this running cluster to read its nodes: HEAD_IP:6379, ray://HEAD_IP:10001 or auto "
        "(default: plan on this machine, join nothing)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=float, default=96)


def local_gpus() -> int:
    """The GPUs Ray would give an embedded instance on this machine (NVML count, capped by CUDA_VISIBLE_DEVICES)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource  # deferred: cli

        gpu = get_accelerator_manager_for_resource("GPU")
        if gpu is None:
            return 0
        count = gpu.get_current_node_num_accelerators()
        visible = gpu.get_current_process_visible_accelerator_ids()
        return min(count, len(visible)) if visible is not None else count
    except Exception:  # noqa: BLE001 - a private Ray helper; without it we cannot see GPUs, so plan with none
        return 0


NOT_HOST_PORT = "not HOST:PORT (the head's GCS port is 6379 by default)"


def _bad_address(address: str, why: str) -> ConfigError:
    return ConfigError(None, f"--address {address}: {why} (nothing was planned)")


def _gcs_target(address: str) -> tuple[str, int]:
    """The host and port `ray.init(address=...)` would connect to; one-line errors for what cannot be one."""
    if "://" in address and not address.startswith("ray://"):
        raise _bad_address(
            address,
            "that is a URL (the job server, for `submit`); plan joins the cluster itself: pass the head's "
            "HEAD_IP:6379, or ray://HEAD_IP:10001",
        )
    target = address.removeprefix("ray://")
    if address == "auto" and "://" in os.environ.get("RAY_ADDRESS", ""):  # exported for `submit`
        raise _bad_address(
            address, f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is the job server; pass the head's HEAD_IP:6379"
        )
    if not address.startswith("ray://"):
        from ray._private.services import canonicalize_bootstrap_address_or_die  # deferred: cli

        try:  # "auto" -> RAY_ADDRESS or the cluster started on this machine; localhost -> the node IP Ray binds
            target = canonicalize_bootstrap_address_or_die(address)
        except ValueError:
            raise _bad_address(address, NOT_HOST_PORT) from None
        except ConnectionError as e:  # "auto" and no cluster found
            raise _bad_address(address, str(e).strip().splitlines()[0]) from None
        except Exception as e:  # noqa: BLE001 - a host name that does not resolve (socket.gaierror), ...
            raise _bad_address(address, f"{type(e).__name__}: {e}") from None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise _bad_address(address, NOT_HOST_PORT)
    if port == "8265":  # open, so Ray would wait minutes on it for a GCS that is not there
        raise _bad_address(address, "port 8265 is the dashboard (the job server, for `submit`); the GCS port is 6379")
    return host.strip("[]"), int(port)


def connect(address: str, timeout_s: float = 5.0) -> None:
    """ray.init to the cluster at `address`, failing in one line within seconds when nothing answers there (Ray
    itself retries a dead GCS address for minutes)."""
    import ray  # deferred: cli

    host, port = _gcs_target(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise _bad_address(
            address,
            f"nothing answers at {host}:{port} ({e.strerror or e}); is the cluster up (cluster/start_head.sh) and "
            f"is that the head's GCS port (6379) or client port (10001)?",
        ) from None
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - auth refused, version mismatch, not a GCS on that port...
        raise _bad_address(
            address, f"cannot join: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from rlhf_dist.orchestration.placement import (  # deferred: cli
        Node,
        ResourceError,
        assign,
        check_fits,
        format_placement,
        nodes_from_ray,
        plan,
        required_resources,
        simulated_nodes,
    )

    cfg = load_config(args.config, args.overrides)
    plans = plan(cfg)
    hint = ""
    if args.nodes:
        nodes = simulated_nodes(args.nodes, args.cpus_per_node, args.gpus_per_node)
        where = f"{args.nodes} node(s) x {args.gpus_per_node} GPU, {args.cpus_per_node:g} CPU"
    elif args.address:
        import ray  # deferred: cli

        connect(args.address)
        try:
            nodes = nodes_from_ray()
        finally:
            ray.shutdown()
        where = f"the cluster at {args.address} ({len(nodes)} node(s))"
    else:
        # as rlhf_dist.orchestration.cluster.ray_session sizes the embedded Ray: logical CPUs never fewer than asked
        need = required_resources(plans)["CPU"]
        cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
        nodes = [Node(socket.gethostname(), cpus, local_gpus())]
        where = f"this machine, as the embedded Ray would size it ({cpus:g} CPU, {nodes[0].gpus} GPU; joined no cluster"
        if cfg.ray.address:
            where += f"; the config's ray.address={cfg.ray.address} was not contacted: pass --address to plan on it"
        where += ")"
        hint = "; this planned on this machine: pass --nodes N or --address ADDR to plan on a cluster"
    try:
        check_fits(plans, {"CPU": sum(n.cpus for n in nodes), "GPU": sum(n.gpus for n in nodes)})
        slots = assign(plans, nodes)
    except ResourceError as e:
        if not hint:
            raise
        raise ResourceError(str(e).removeprefix(f"{e.key}: ") + hint) from None
    print(f"placement of {args.config} on {where}:")
    print(format_placement(slots))
    return 0
