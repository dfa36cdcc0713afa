"""Connecting to Ray: the embedded local instance by default (bound to loopback), or a cluster by address."""

from __future__ import annotations

import os
from contextlib import contextmanager

import ray

from rlhf_dist.config import RunConfig


def worker_env() -> dict[str, str]:
    # DS_ACCELERATOR is decided on each worker (rlhf_dist.workers.common): the driver may have no GPU where they do.
    return {"TOKENIZERS_PARALLELISM": "false"}


# Ray prestarts idle workers for a driver's first tasks, but every actor here runs in the job's runtime_env (worker_env)
# and so gets a worker of its own: the prestarted ones only cost start-up CPU (~1.3 s of a 2-core machine per start).
LOCAL_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def init_local(num_cpus: int) -> None:
    """Starts the embedded local Ray instance (jobs, tests and benchmarks alike): no dashboard, the workers' env."""
    # Binds local Ray to 127.0.0.1 only if set before Ray was first imported (the CLI does that).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": worker_env()},
        _system_config=LOCAL_SYSTEM_CONFIG,
    )


@contextmanager
def ray_session(cfg: RunConfig, min_cpus: float = 0):
    """Yields with Ray connected; shuts down only what it started."""
    if ray.is_initialized():
        yield
        return
    if cfg.ray.address is None:
        init_local(cfg.ray.num_cpus or max(os.cpu_count() or 1, int(min_cpus + 0.999)))
    else:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": worker_env()})
    try:
        yield
    finally:
        ray.shutdown()
