"""Set up (and tear down) the torch.distributed group that one learner role's actors train in.

Rank and world size come from the caller: in production a RoleGroup hands them out to its actors together with
rank 0's address and a free port; in tests a spawner does. DeepSpeed reads the same settings from environment
variables, so we set those too and let ``deepspeed.init_distributed`` create the group: that way DeepSpeed's own
communication wrapper (``deepspeed.comm``) is bound to the group we made instead of trying MPI discovery.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; a small race with other binders remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's address as its peers reach it (Ray's view when Ray is installed): what rank 0 advertises."""
    try:
        import ray.util  # deferred: ray

        return ray.util.get_node_ip_address()
    except Exception:  # no Ray, or it cannot tell: ask the routing table, then give up on loopback
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def default_backend() -> str:
    """nccl when this process sees a CUDA device, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_local_rank(rank: int) -> int:
    """Which local CUDA device this rank drives.

    Ray gives each actor only its own GPU(s) through CUDA_VISIBLE_DEVICES, so the local device is usually 0; when a
    process sees several devices (torchrun-style launch on one node) ranks are spread over them.
    """
    if not torch.cuda.is_available():
        return 0
    count = torch.cuda.device_count()
    return 0 if count <= 1 else rank % count


def interface_of(ip: str) -> str | None:
    """The network interface holding ``ip`` (None if no interface does)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_rank: int | None = None,
) -> str:
    """Join (or create) the default process group; idempotent. Returns the backend in use.

    Every rank must call this with the same ``world_size``, ``master_addr`` and ``master_port``. ``master_port``
    may be None only for ``world_size == 1`` (a free port is picked). Calling it again in a process that already
    has a group is a no-op if rank and world size match, and an error if they do not.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_process_group: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ValueError("init_process_group: backend='nccl' needs a CUDA device and none is visible; use 'gloo'")
    if dist.is_initialized():
        have_rank, have_world = dist.get_rank(), dist.get_world_size()
        if (have_rank, have_world) != (rank, world_size):
            raise RuntimeError(
                f"init_process_group: this process already joined a group as rank {have_rank} of {have_world}, "
                f"asked for rank {rank} of {world_size}; call destroy_process_group() first"
            )
        _bind_deepspeed_comm(dist.get_backend(), timeout_s)
        return dist.get_backend()

    backend = backend or default_backend()
    if master_port is None:
        if world_size > 1:
            raise ValueError(
                "init_process_group: master_port is required when world_size > 1 (all ranks must agree on it; "
                "let rank 0 call find_free_port() and hand the port to the others)"
            )
        master_port = find_free_port(master_addr)
    local_rank = default_local_rank(rank) if local_rank is None else local_rank

    # The variables DeepSpeed's launcher would set; deepspeed.init_distributed and ZeRO read them.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    if not cuda:
        # Must be set before DeepSpeed first picks its accelerator; respect an explicit choice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        # Bind the device before the NCCL communicator is created, or every rank would land on GPU 0.
        torch.cuda.set_device(local_rank)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        # Gloo binds to whatever the hostname resolves to (often 127.0.x.1): peers on other nodes then dial loopback
        # and the group never forms. Bind to the interface that carries this node's address instead; a loopback
        # master means a single-node group, which stays on loopback.
        ifname = interface_of("127.0.0.1" if master_addr.startswith("127.") else node_ip())
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname

    timeout = timedelta(seconds=timeout_s)
    try:
        import deepspeed  # deferred: deepspeed
    except ImportError:  # the torch engine works without DeepSpeed
        deepspeed = None
    if deepspeed is not None:
        _skip_inference_shm_op(deepspeed)
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timeout,
            rank=rank,
            world_size=world_size,
            verbose=False,
        )
    else:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout, init_method=f"tcp://{master_addr}:{master_port}"
        )
    logger.info("process group up: rank %d/%d backend %s at %s:%s", rank, world_size, backend, master_addr, master_port)
    return backend


def _skip_inference_shm_op(deepspeed) -> None:
    """DeepSpeed's comm layer compiles and loads a shared-memory all-reduce kernel on CPU at every group start (~60 s
    of C++ compile per fresh machine or checkout, one shm segment per rank). It serves only ``inference_all_reduce``
    (tensor-parallel inference); training reduces through the process group, so the kernel is marked unbuildable,
    which DeepSpeed treats as "fall back to the process group". ``__compatible_ops__`` is one cached dict, probed on
    first access (compilers, GPUs): GPU accelerators have no such kernel, so there it is left alone."""
    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_process_group(engine_name: str, rank: int, world_size: int) -> None:
    """Make sure the default group matches (rank, world_size); create a 1-rank group when alone."""
    if world_size == 1 or dist.is_initialized():
        init_process_group(rank, world_size)  # idempotent; errors clearly on a rank/world mismatch
        return
    raise RuntimeError(
        f"{engine_name}: world_size={world_size} but this process has not joined a process group; call "
        "rlhf_dist.comm.process_group.init_process_group(rank, world_size, master_addr, master_port) "
        "on every rank first"
    )


def _bind_deepspeed_comm(backend: str, timeout_s: float) -> None:
    """If someone made the group with plain torch, let DeepSpeed's comm layer adopt it (cheap when already bound)."""
    try:
        import deepspeed  # deferred: deepspeed
        import deepspeed.comm as ds_comm  # deferred: deepspeed
    except ImportError:
        return
    if not ds_comm.is_initialized():
        _skip_inference_shm_op(deepspeed)
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False
        )


def destroy_process_group() -> None:
    """Leave the default group (no-op without one), so a later init_process_group can start a new one."""
    if not dist.is_initialized():
        return
    try:
        import deepspeed.comm as ds_comm  # deferred: deepspeed
    except ImportError:
        ds_comm = None
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached references to the group
    else:
        dist.destroy_process_group()
