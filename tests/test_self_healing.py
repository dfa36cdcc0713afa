"""A run heals: an actor that dies is restarted by Ray, given the run's state back and its shard re-run; a learner
that dies takes the run back to its last complete checkpoint. Either way the run ends with exactly the metrics of
an uninterrupted one: every sample's seed derives from (seed, iteration, rank), so repeated work repeats exactly."""

import json
import os
import random
import signal
import threading
import time
from contextlib import contextmanager

import pytest

pytestmark = pytest.mark.slow

# what a heal may change: how long things took and how often they were restarted
NOT_COMPARED = ("time/", "compute/", "critical/", "overhead", "memory/", "overlapped/", "restarts/")
ITERATIONS = 6


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _cfg(tiny_model, out, *extra):
    from rlhf_dist.config import load_config

    return load_config(
        "configs/tiny_cpu.yaml",
        [
            f"model.policy={tiny_model}",
            f"output_dir={out}",
            "logging.progress_bar=false",
            "logging.plot=false",
            "train.prompts_per_iteration=16",
            "generation.max_new_tokens=8",
            f"train.iterations={ITERATIONS}",
            "checkpoint.save_every=2",
            "checkpoint.save_final=false",
            *extra,
        ],
    )


def assert_same_metrics(healed: list[dict], straight: list[dict]) -> None:
    assert [r["iteration"] for r in healed] == list(range(ITERATIONS))
    for a, b in zip(straight, healed):
        keys = {k for k in a if not k.startswith(NOT_COMPARED)}
        assert keys == {k for k in b if not k.startswith(NOT_COMPARED)}
        for key in sorted(keys):
            assert a[key] == b[key], (a["iteration"], key, a[key], b[key])


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """The uninterrupted run every healed run is compared with."""
    from rlhf_dist.trainers.ppo import run

    return _rows(run(_cfg(tiny_model, tmp_path_factory.mktemp("straight")))["metrics_path"])


class Killer(threading.Thread):
    """SIGKILLs actors of a live run: for each (after_rows, delay_s, role, rank), once the metrics file has
    ``after_rows`` rows, waits ``delay_s`` and kills that actor's process (Ray sees a crash, not a request)."""

    def __init__(self, metrics_path, groups_seen: list, plan: list[tuple[int, float, str, int]]):
        super().__init__(daemon=True)
        self.path, self.groups_seen, self.plan = metrics_path, groups_seen, plan
        self.killed: list[tuple[str, int, float]] = []
        self.stop = threading.Event()

    def _rows_logged(self) -> int:
        try:
            return sum(1 for _ in open(self.path))
        except FileNotFoundError:
            return 0

    def run(self):
        for after_rows, delay_s, role, rank in self.plan:
            while self._rows_logged() < after_rows or not self.groups_seen:
                if self.stop.wait(0.02):
                    return
            time.sleep(delay_s)
            group = self.groups_seen[-1][role]
            pid = group.pids[rank] or _pid_of(group, rank)
            os.kill(pid, signal.SIGKILL)
            self.killed.append((role, rank, time.monotonic()))


def _pid_of(group, rank):
    import ray

    return ray.get(group.actors[rank].ping.remote())


@contextmanager
def killing(monkeypatch, metrics_path, plan):
    """Runs a Killer beside ``ppo.run`` in this process; sees the run's role groups as they are launched."""
    from rlhf_dist.orchestration import launch
    from rlhf_dist.trainers import ppo

    seen: list = []

    @contextmanager
    def running_roles(cfg):
        with launch.running_roles(cfg) as groups:
            seen.append(groups)
            yield groups

    monkeypatch.setattr(ppo, "running_roles", running_roles)
    killer = Killer(metrics_path, seen, plan)
    killer.start()
    try:
        yield killer
    finally:
        killer.stop.set()
        killer.join(timeout=5)


def test_killed_rollout_reward_and_reference_actors_heal_to_identical_metrics(
    tiny_model, tmp_path, monkeypatch, straight
):
    from rlhf_dist.trainers.ppo import run

    cfg = _cfg(tiny_model, tmp_path / "healed")
    plan = [(1, 0.0, "rollout", 0), (2, 0.05, "reward", 0), (3, 0.0, "reference", 0), (4, 0.1, "rollout", 0)]
    with killing(monkeypatch, tmp_path / "healed" / "metrics.jsonl", plan) as killer:
        healed = _rows(run(cfg)["metrics_path"])
    assert len(killer.killed) == len(plan)
    assert healed[-1]["restarts/rollout"] == 2
    assert healed[-1]["restarts/reward"] == 1
    assert healed[-1]["restarts/reference"] == 1
    assert_same_metrics(healed, straight)


def test_chaos_random_kills_of_random_actors_end_in_identical_metrics(tiny_model, tmp_path, monkeypatch, straight):
    """Seeded chaos: several kills of random actors (learners included) at random moments in one run."""
    from rlhf_dist.trainers.ppo import run

    rng = random.Random(7)
    roles = ("rollout", "reward", "reference", "policy", "critic")
    plan = sorted((rng.randrange(1, ITERATIONS - 1), rng.uniform(0, 0.3), rng.choice(roles), 0) for _ in range(4))
    cfg = _cfg(tiny_model, tmp_path / "chaos", "checkpoint.max_auto_resume=4")
    with killing(monkeypatch, tmp_path / "chaos" / "metrics.jsonl", plan) as killer:
        healed = _rows(run(cfg)["metrics_path"])
    assert len(killer.killed) == len(plan), (plan, killer.killed)
    assert_same_metrics(healed, straight)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        return []


def test_killed_driver_is_resumed_by_the_supervisor_to_identical_metrics(tiny_model, tmp_path, straight):
    """`rlhf-dist train` runs the driver as its child; SIGKILL it mid-run and the run resumes from its last
    checkpoint in a new driver, ending with the uninterrupted run's metrics."""
    import subprocess
    import sys

    out = tmp_path / "driver_killed"
    cfg = _cfg(tiny_model, out)  # validates the overrides below
    overrides = [
        f"model.policy={cfg.model.policy}",
        f"output_dir={out}",
        "logging.progress_bar=false",
        "logging.plot=false",
        "train.prompts_per_iteration=16",
        "generation.max_new_tokens=8",
        f"train.iterations={ITERATIONS}",
        "checkpoint.save_every=2",
        "checkpoint.save_final=false",
    ]
    log = open(tmp_path / "supervisor.log", "w")
    sup = subprocess.Popen(
        [sys.executable, "-m", "rlhf_dist.cli", "train", "configs/tiny_cpu.yaml", *overrides],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and sum(1 for _ in open(metrics)) >= 3):
            assert sup.poll() is None and time.monotonic() < deadline, open(tmp_path / "supervisor.log").read()
            time.sleep(0.05)
        (driver,) = _children(sup.pid)
        t_kill = time.monotonic()
        os.kill(driver, signal.SIGKILL)
        assert sup.wait(timeout=600) == 0, open(tmp_path / "supervisor.log").read()
    finally:
        if sup.poll() is None:
            for pid in _children(sup.pid):
                os.kill(pid, signal.SIGKILL)
            sup.kill()
        log.close()
    text = open(tmp_path / "supervisor.log").read()
    assert "was killed by SIGKILL; resuming from the last complete checkpoint (1/2)" in text
    print(f"driver killed, run finished {time.monotonic() - t_kill:.1f} s later")
    assert_same_metrics(_rows(metrics), straight)
