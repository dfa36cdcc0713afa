"""`rlhf-dist submit` against a real two-node Ray cluster: head and worker in two network namespaces.

The cluster is started by cluster/start_head.sh and cluster/join_worker.sh with token auth on, exactly as a user
would; every client call runs inside the head namespace (`cluster.run`), so no packet leaves the namespaces.
Timings (submit -> job start, total) are printed: run with `-s` to see them.
"""

import json
import os
import signal
import sys
import textwrap
import threading
import time

import pytest
from netns_cluster import HEAD_IP, REPO, WORKER_IP, netns_cluster

SPREAD_JOB = """
import json, time
print("JOB_START", time.time(), flush=True)
import ray
ray.init()

@ray.remote(num_cpus=1)
class Where:
    def where(self):
        return ray.util.get_node_ip_address()

here = Where.options(resources={"netns_head": 0.01}).remote()
there = Where.options(resources={"netns_worker": 0.01}).remote()
print("NODES", json.dumps(ray.get([here.where.remote(), there.where.remote()])), flush=True)
"""


def client(cluster, body: str, timeout: float = 300, env: dict | None = None):
    """Run Python `body` inside the head namespace with `from rlhf_dist import submit as S` and ADDR in scope;
    the body's last statement should be `sys.exit(rc)`."""
    code = (
        f"import json, sys, time\nfrom rlhf_dist import submit as S\nADDR = {cluster.dashboard_address!r}\n"
        f"print('SUBMIT_AT', time.time(), flush=True)\n" + textwrap.dedent(body)
    )
    return cluster.run([sys.executable, "-c", code], timeout=timeout, env=env)


def stamp(out: str, key: str) -> str:
    return next(line.split(None, 1)[1] for line in out.splitlines() if line.startswith(key + " "))


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    with netns_cluster(head_cpus=4, worker_cpus=4, auth="token", start_with_scripts=True) as c:
        print(f"\n[netns cluster] two nodes alive after {time.monotonic() - t0:.1f} s")
        yield c
    print(f"[netns cluster] torn down; {time.monotonic() - t0:.1f} s in all")


# --- no cluster needed: a bad config or a missing address fails before anything is sent ---------------------------


def test_bad_config_fails_before_submitting(capsys):
    from rlhf_dist.submit import submit

    # port 9 on loopback: nothing listens, and nothing may be sent there anyway
    rc = submit(
        str(REPO / "configs/tiny_cpu.yaml"), ["train.iterationz=2"], address="http://127.0.0.1:9", working_dir=str(REPO)
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.iterationz" in err and "nothing was submitted" in err


def test_missing_address_names_the_fix(capsys, monkeypatch):
    from rlhf_dist.submit import submit

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit(str(REPO / "configs/tiny_cpu.yaml"), ["train.iterations=1"], working_dir=str(REPO)) == 2
    assert "--address http://HEAD_IP:8265" in capsys.readouterr().err


def test_cli_parses_actions():
    import argparse

    from rlhf_dist.submit import add_submit_parser

    parser = argparse.ArgumentParser()
    add_submit_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(
        [
            "submit",
            "configs/tiny_cpu.yaml",
            "train.iterations=2",
            "--no-follow",
            "--address",
            "http://h:8265",
            "--env",
            "A=1",
        ]
    )
    assert (a.config, a.overrides, a.follow, a.address, a.env) == (
        "configs/tiny_cpu.yaml",
        ["train.iterations=2"],
        False,
        "http://h:8265",
        [("A", "1")],
    )
    a = parser.parse_args(["submit", "--stop", "raysubmit_1"])
    assert a.stop == "raysubmit_1" and a.config is None and a.func is a.handler


# --- the two-node cluster ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_job_uses_both_nodes(cluster, tmp_path):
    (tmp_path / "spread.py").write_text(SPREAD_JOB)
    t0 = time.time()
    proc = client(
        cluster,
        f"""
        rc = S.submit_command("python spread.py", ADDR, working_dir={str(tmp_path)!r})
        print("JOB_END", time.time(), flush=True)
        sys.exit(rc)
    """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.logs()
    assert set(json.loads(stamp(proc.stdout, "NODES"))) == {HEAD_IP, WORKER_IP}
    assert "SUCCEEDED" in proc.stdout
    submit_at = float(stamp(proc.stdout, "SUBMIT_AT"))
    print(
        f"\n[spread job] submit -> job start {float(stamp(proc.stdout, 'JOB_START')) - submit_at:.1f} s, "
        f"submit -> done {float(stamp(proc.stdout, 'JOB_END')) - submit_at:.1f} s, "
        f"client process {time.time() - t0:.1f} s"
    )


@pytest.mark.slow
def test_failing_job_is_nonzero(cluster, tmp_path):
    proc = client(
        cluster,
        f"""
        sys.exit(S.submit_command("python -c 'import sys; print(\\"boom\\"); sys.exit(3)'", ADDR,
                                  working_dir={str(tmp_path)!r}))
    """,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "boom" in proc.stdout
    assert "FAILED" in proc.stderr and "exit code 3" in proc.stderr


@pytest.mark.slow
def test_status_logs_stop(cluster, tmp_path):
    proc = client(
        cluster,
        f"""
        job = "rlhfd-sleeper-{tmp_path.name}"
        assert S.submit_command("echo started; sleep 600", ADDR, working_dir={str(tmp_path)!r}, follow=False,
                                job_id=job) == 0
        assert S.submit_command("true", ADDR, working_dir={str(tmp_path)!r}, job_id=job) == 2  # id taken
        from ray.job_submission import JobSubmissionClient
        c = JobSubmissionClient(ADDR)
        deadline = time.time() + 120
        while "started" not in c.get_job_logs(job):
            assert time.time() < deadline, c.get_job_info(job)
            time.sleep(0.5)
        assert S.status(job, ADDR) == 0          # RUNNING
        assert S.logs(job, ADDR) == 0
        assert S.stop(job, ADDR) == 0
        assert S.status(job, ADDR) == 1          # STOPPED
        assert S.status("raysubmit_nope", ADDR) == 2
        sys.exit(0)
    """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RUNNING" in proc.stdout and "STOPPED" in proc.stderr and "started" in proc.stdout


@pytest.mark.slow
def test_client_without_token_is_refused(cluster, tmp_path):
    proc = client(
        cluster,
        f"""
        sys.exit(S.submit_command("true", ADDR, working_dir={str(tmp_path)!r}))
    """,
        env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr


@pytest.mark.slow
def test_scripts_refuse_when_ray_already_runs(cluster):
    head = cluster.run(["bash", str(REPO / "cluster/start_head.sh"), "--node-ip", HEAD_IP], timeout=60)
    worker = cluster.run(
        ["bash", str(REPO / "cluster/join_worker.sh"), cluster.head_address, "--node-ip", WORKER_IP],
        node="worker",
        timeout=60,
    )
    for proc in (head, worker):
        assert proc.returncode == 2 and "already runs on this node" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ppo_job_over_two_nodes(cluster, tiny_model, tmp_path):
    """`rlhf-dist submit configs/tiny_cpu.yaml` on the two-node cluster: the two policy learners land on different
    nodes (placement=spread), form one process group across them, and the run finishes with its metrics. Midway the
    job's driver is SIGKILLed: the job's `rlhf-dist train` (its supervisor) starts it again, and it resumes from the
    run's last checkpoint on the same cluster."""
    out = tmp_path / "run"
    overrides = [
        f"model.policy={tiny_model}",
        f"output_dir={out}",
        "train.iterations=4",
        "train.prompts_per_iteration=8",
        "generation.max_new_tokens=6",
        "logging.plot=false",
        "logging.progress_bar=false",
        "roles.policy.num_actors=2",
        "roles.policy.placement=spread",
        "checkpoint.save_every=2",
        "ray.actor_timeout_s=180",
    ]  # a hang fails in minutes, not the default 10
    killer = DriverKiller(out, after_rows=3)
    killer.start()
    try:
        proc = client(
            cluster,
            f"""
            rc = S.submit({str(REPO / "configs/tiny_cpu.yaml")!r}, {overrides!r}, ADDR, working_dir={str(REPO)!r})
            print("JOB_END", time.time(), flush=True)
            from ray.util.state import list_actors
            learners = list_actors(address=ADDR, filters=[("class_name", "=", "PolicyWorker")], detail=True)
            print("POLICY_NODES", json.dumps(sorted({{a.node_id for a in learners}})), flush=True)
            sys.exit(rc)
        """,
            timeout=800,
        )
    finally:
        killer.stop.set()
        killer.join(timeout=5)
    assert killer.killed, "the job's driver was never found to kill"
    assert len(json.loads(stamp(proc.stdout, "POLICY_NODES"))) >= 2, proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "was killed by SIGKILL; resuming from the last complete checkpoint (1/2)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert len(json.loads((out / "run.json").read_text())["attempts"]) == 2
    submit_at = float(stamp(proc.stdout, "SUBMIT_AT"))
    print(f"\n[ppo job] submit -> done {float(stamp(proc.stdout, 'JOB_END')) - submit_at:.1f} s, driver killed once")


class DriverKiller(threading.Thread):
    """SIGKILLs the job's driver once ``after_rows`` metrics rows are written: the process the job's supervisor
    started (RLHF_DIST_DRIVER=1 in its environment) for this output dir. Same machine, so /proc shows it."""

    def __init__(self, out, after_rows: int):
        super().__init__(daemon=True)
        self.out, self.after_rows, self.killed, self.stop = out, after_rows, [], threading.Event()

    def driver(self) -> int | None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                environ = open(f"/proc/{entry.name}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{entry.name}/cmdline", "rb").read()
            except OSError:
                continue
            if b"RLHF_DIST_DRIVER=1" in environ and str(self.out).encode() in cmdline:
                return int(entry.name)
        return None

    def run(self):
        metrics = self.out / "metrics.jsonl"
        while not self.stop.wait(0.1):
            rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            pid = self.driver() if rows >= self.after_rows else None
            if pid:
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                return
