"""A real two-node Ray cluster on one machine, each node in its own network namespace.

    with netns_cluster(head_cpus=2, worker_cpus=2) as c:
        c.run(["python", "-c", "import ray; ray.init(); print(ray.nodes())"])   # inside the head namespace
        c.dashboard_address                                                   # http://10.213.77.1:8265

Layout: namespaces ``rlhfd-<pid>-<rand>-h`` (head, 10.213.77.1) and ``...-w`` (worker, 10.213.77.2) joined by one
veth pair whose ends are both called ``rd0``; ``lo`` is up in each. Nothing else is routed: no default route, no
link to the host's interfaces, so every packet the cluster sends stays on this veth or a namespace's own loopback.
The host's network is left untouched.

The head runs ``ray start --head --node-ip-address 10.213.77.1`` in the head namespace; the worker runs
``ray start --address 10.213.77.1:6379 --node-ip-address 10.213.77.2`` in the other. Its raylet finds the GCS by
that address alone; everything else (object manager, node manager, agents) uses the nodes' own addresses.
Each node has its own ``--temp-dir``, so sessions, sockets and logs never mix with any other Ray on the machine.

Teardown never runs ``ray stop``: it kills every Ray process on the machine, other people's included (it matches by
process name, and namespaces share the pid space). Instead every process inside our namespaces
(``ip netns pids``) gets SIGTERM, then SIGKILL, and the namespaces are deleted. Namespaces left by a run that was
killed outright (their creator pid is gone) are cleaned the same way at the next start.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "rlhfd-"  # namespaces this helper owns: rlhfd-<creator pid>-h / -w
SUBNET = "10.213.77"  # unusual on purpose; private to the namespaces
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
GCS_PORT, DASHBOARD_PORT = 6379, 8265
IFNAME = "rd0"  # the veth end's name in each namespace (like eth0 on a real node)
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def skip_reason() -> str | None:
    """Why the netns cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "netns cluster needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "netns cluster needs iproute2 (`ip` not found)"
    if not (VENV_BIN / "ray").exists():
        return f"netns cluster needs the ray CLI next to {sys.executable}"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` does not work here: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.strip().isdigit()]


def _kill_ns(ns: str, grace_s: float = 3.0) -> None:
    """SIGTERM every process inside ``ns``, SIGKILL what is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _ns_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _ns_pids(ns)
        if not pids:
            return


def _destroy_ns(ns: str) -> None:
    _kill_ns(ns)
    _ip("netns", "del", ns, check=False)  # also removes the veth end inside it (and so its peer)


def clean_stale() -> None:
    """Remove namespaces this helper made in runs whose creator process no longer exists."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns.startswith(PREFIX):
            continue
        creator = ns[len(PREFIX) :].split("-")[0]
        if creator.isdigit() and int(creator) != os.getpid() and not Path(f"/proc/{creator}").exists():
            _destroy_ns(ns)
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        creator = d.name[len(PREFIX) :].split("-")[0]
        if creator.isdigit() and not Path(f"/proc/{creator}").exists():
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class NetnsCluster:
    head_ns: str
    worker_ns: str
    head_ip: str
    worker_ip: str
    head_address: str  # GCS, for `ray start --address` / `ray.init(address=...)`
    dashboard_address: str  # job server, for JobSubmissionClient / rlhf_dist.submit
    env: dict[str, str]  # what every command in the namespaces runs with
    temp_root: Path
    head_resources: dict[str, float] = field(default_factory=dict)
    worker_resources: dict[str, float] = field(default_factory=dict)

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        node: str = "head",
        timeout: float = 300,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a list, or a string for bash) inside the head (or worker) namespace; output captured."""
        ns = {"head": self.head_ns, "worker": self.worker_ns}[node]
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            env={**self.env, **(env or {})},
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv} in {ns} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def logs(self, tail: int = 30) -> str:
        """The last lines of every Ray log of both nodes whose name hints at trouble (for failure messages)."""
        out = []
        for f in sorted(self.temp_root.glob("*/session_latest/logs/*")):
            if f.is_file() and f.suffix in (".err", ".out", ".log") and f.stat().st_size:
                if any(k in f.name for k in ("raylet", "gcs_server", "dashboard", "job-driver", "runtime_env")):
                    lines = f.read_text(errors="replace").splitlines()[-tail:]
                    out.append(f"=== {f.relative_to(self.temp_root)}\n" + "\n".join(lines))
        return "\n".join(out)


def _wait_alive(cluster: NetnsCluster, n: int, timeout: float) -> None:
    """Poll the head's state API (the dashboard) until ``n`` nodes are ALIVE: the job server is then up too."""
    script = f"""
import sys, time
from ray.util.state import list_nodes
deadline, last = time.monotonic() + {timeout}, None
while time.monotonic() < deadline:
    try:
        alive = list_nodes(address={cluster.dashboard_address!r}, filters=[("state", "=", "ALIVE")], timeout=10)
        if len(alive) >= {n}:
            print(sorted(x.node_ip for x in alive)); sys.exit(0)
        last = f"{{len(alive)}} alive"
    except Exception as e:
        last = repr(e)
    time.sleep(1)
sys.exit("nodes not alive after {timeout}s: " + str(last))
"""
    proc = cluster.run([sys.executable, "-c", script], timeout=timeout + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"netns cluster did not come up: {proc.stderr.strip()[-2000:]}\n{cluster.logs()}")


@contextmanager
def netns_cluster(
    head_cpus: int = 2,
    worker_cpus: int = 2,
    *,
    head_resources: dict[str, float] | None = None,
    worker_resources: dict[str, float] | None = None,
    object_store_mb: int = 300,
    auth: str = "disabled",
    start_with_scripts: bool = False,
    up_timeout: float = 120,
) -> Iterator[NetnsCluster]:
    """Two real Ray nodes in two network namespaces; torn down in ``finally`` whatever happens.

    ``head_resources``/``worker_resources`` default to ``{"netns_head": 1}``/``{"netns_worker": 1}`` so a test can pin
    an actor to a node with ``resources={"netns_worker": 0.01}``. ``auth``: "disabled", or "token" (a fresh random
    token in ``env["RAY_AUTH_TOKEN"]``, given to both nodes and every command). ``start_with_scripts`` starts the
    nodes with cluster/start_head.sh and cluster/join_worker.sh instead of calling ``ray start`` directly.
    Skips the test (pytest.skip) where it cannot run: not root, no ``ip netns``.
    """
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if auth not in ("disabled", "token"):
        raise ValueError(f"auth must be 'disabled' or 'token', got {auth!r}")
    clean_stale()

    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
    head_ns, worker_ns = f"{tag}-h", f"{tag}-w"
    temp_root = Path(tempfile.gettempdir()) / tag  # short: Ray's unix socket paths must stay under 108 bytes
    head_resources = {"netns_head": 1} if head_resources is None else head_resources
    worker_resources = {"netns_worker": 1} if worker_resources is None else worker_resources

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_") and k not in ("PYTEST_CURRENT_TEST", "VIRTUAL_ENV")
    }
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        RAY_AUTH_MODE=auth,
        PYTHONUNBUFFERED="1",
    )
    env["RAY_ADDRESS"] = f"{HEAD_IP}:{GCS_PORT}"  # a plain ray.init() in run() joins this cluster
    if auth == "token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    cluster = NetnsCluster(
        head_ns,
        worker_ns,
        HEAD_IP,
        WORKER_IP,
        f"{HEAD_IP}:{GCS_PORT}",
        f"http://{HEAD_IP}:{DASHBOARD_PORT}",
        env,
        temp_root,
        head_resources,
        worker_resources,
    )
    made: list[str] = []
    try:
        for ns in (head_ns, worker_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        # Both ends are made inside the namespaces, so nothing appears on the host, and both can have one name.
        _ip("link", "add", IFNAME, "netns", head_ns, "type", "veth", "peer", "name", IFNAME, "netns", worker_ns)
        for ns, addr in ((head_ns, HEAD_IP), (worker_ns, WORKER_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", IFNAME, "up")
        temp_root.mkdir(parents=True, exist_ok=True)

        common = ["--object-store-memory", str(object_store_mb * 1024 * 1024), "--disable-usage-stats"]
        if start_with_scripts:
            head = [
                "bash",
                str(REPO / "cluster/start_head.sh"),
                "--node-ip",
                HEAD_IP,
                "--num-cpus",
                str(head_cpus),
                "--num-gpus",
                "0",
                "--",
                "--temp-dir",
                str(temp_root / "h"),
                "--resources",
                json.dumps(head_resources),
                *common,
            ]
            worker = [
                "bash",
                str(REPO / "cluster/join_worker.sh"),
                cluster.head_address,
                "--node-ip",
                WORKER_IP,
                "--num-cpus",
                str(worker_cpus),
                "--num-gpus",
                "0",
                "--",
                "--temp-dir",
                str(temp_root / "w"),
                "--resources",
                json.dumps(worker_resources),
                *common,
            ]
        else:
            head = [
                "ray",
                "start",
                "--head",
                "--node-ip-address",
                HEAD_IP,
                "--port",
                str(GCS_PORT),
                "--dashboard-host",
                HEAD_IP,
                "--dashboard-port",
                str(DASHBOARD_PORT),
                "--num-cpus",
                str(head_cpus),
                "--num-gpus",
                "0",
                "--temp-dir",
                str(temp_root / "h"),
                "--resources",
                json.dumps(head_resources),
                *common,
            ]
            worker = [
                "ray",
                "start",
                "--address",
                cluster.head_address,
                "--node-ip-address",
                WORKER_IP,
                "--num-cpus",
                str(worker_cpus),
                "--num-gpus",
                "0",
                "--temp-dir",
                str(temp_root / "w"),
                "--resources",
                json.dumps(worker_resources),
                *common,
            ]
        cluster.run(head, timeout=up_timeout, check=True)
        cluster.run(worker, node="worker", timeout=up_timeout, check=True)
        _wait_alive(cluster, 2, up_timeout)
        yield cluster
    finally:
        for ns in reversed(made):
            _destroy_ns(ns)
        shutil.rmtree(temp_root, ignore_errors=True)
