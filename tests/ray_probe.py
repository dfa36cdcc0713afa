"""A job target for tests: the address a local Ray run started from the CLI binds (see test_cli_binds_loopback)."""

from rlhf_dist.orchestration.cluster import ray_session


def node_ip(cfg) -> int:
    import ray

    with ray_session(cfg):
        print("RAY_NODE_IP", ray.util.get_node_ip_address(), flush=True)
    return 0
