"""A run heals: an actor that dies is restarted by Ray, given the run's state back and its shard re-run; a learner
that dies takes the run back to its last complete checkpoint. Either way the run ends with exactly the metrics of
an uninterrupted one: every sample's seed derives from (seed, iteration, rank), so repeated work repeats exactly."""

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import healing  # noqa: E402  (benchmarks/healing.py: kills processes of a job's own process tree)

pytestmark = pytest.mark.slow

# what a heal may change: how long things took and how often they were restarted
NOT_COMPARED = healing.NOT_COMPARED
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
            "algo.kl_target=0.05",  # the adaptive KL controller's state must survive a resume too
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
            while not self._kill(role, rank):  # its roles were stopping for a resume: kill it in the next launch
                launches = len(self.groups_seen)
                while len(self.groups_seen) == launches:
                    if self.stop.wait(0.02):
                        return

    def _kill(self, role: str, rank: int) -> bool:
        group = self.groups_seen[-1][role]
        try:
            os.kill(group.pids[rank] or _pid_of(group, rank), signal.SIGKILL)
        except (ProcessLookupError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        self.killed.append((role, rank, time.monotonic()))
        return True


def _pid_of(group, rank):
    return ray.get(group.actors[rank].ping.remote(), timeout=30)


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


def test_chaos_random_kills_of_random_actors_end_in_identical_metrics(tiny_model, tmp_path, monkeypatch, straight):
    """Seeded chaos: several kills of random actors (learners included) at random moments in one run."""
    from rlhf_dist.trainers.ppo import run

    rng = random.Random(7)
    roles = ("rollout", "reward", "reference", "policy", "critic")
    plan = sorted((rng.randrange(1, ITERATIONS - 1), rng.uniform(0, 0.3), rng.choice(roles), 0) for _ in range(3))
    cfg = _cfg(tiny_model, tmp_path / "chaos", "checkpoint.max_auto_resume=4")
    with killing(monkeypatch, tmp_path / "chaos" / "metrics.jsonl", plan) as killer:
        healed = _rows(run(cfg)["metrics_path"])
    assert len(killer.killed) == len(plan), (plan, killer.killed)
    assert_same_metrics(healed, straight)


def test_killed_actors_and_driver_heal_to_identical_metrics(tiny_model, tmp_path, straight):
    """`rlhf-dist train` as a user runs it; SIGKILL from outside, one after another: the rollout, reward and reference
    actors (restarted by Ray, restored, their shard re-run), then the driver (resumed by its supervisor from the last
    checkpoint). The run ends with the uninterrupted run's metrics, and stays one run."""
    from rlhf_dist.checkpoint import checkpoint_identity
    from rlhf_dist.config import ConfigError
    from rlhf_dist.trainers.ppo import run

    out = tmp_path / "killed"
    kills = [(1, healing.FAULTS["rollout"]), (2, healing.FAULTS["reward"]), (3, healing.FAULTS["reference"])]
    kills.append((4, healing.FAULTS["driver"]))
    extra = [
        f"model.policy={tiny_model}",
        "train.prompts_per_iteration=16",
        "generation.max_new_tokens=8",
        "algo.kl_target=0.05",
    ]
    job = healing.run_job(out, ITERATIONS, kills, extra)
    log = open(job["log"]).read()
    assert job["rc"] == 0 and [k[0] for k in job["killed"]] == [k[1] for k in kills], log
    assert all(len(k) == 3 for k in job["killed"])  # each killed iteration was logged (again) before the next kill
    for role in ("rollout", "reward", "reference"):
        assert f"role {role} actor 0 restarted (1 so far)" in log
    assert "was killed by SIGKILL; resuming from the last complete checkpoint (1/2)" in log
    assert_same_metrics(_rows(out / "metrics.jsonl"), straight)

    # One run, started twice; its checkpoints name it. Another run can neither start over it nor resume it as its
    # own: both are refused before any actor starts, and the dir is left as it was.
    manifest = json.loads((out / "run.json").read_text())
    assert len(manifest["attempts"]) == 2
    kept = sorted((out / "checkpoints").glob("iter_*"))
    assert [p.name for p in kept] == ["iter_4", "iter_6"]
    assert {checkpoint_identity(p)["run_id"] for p in kept} == {manifest["run_id"]}
    with pytest.raises(ConfigError, match=r"^output_dir: .* holds checkpoints, metrics\.jsonl of run "):
        run(_cfg(tiny_model, out))
    with pytest.raises(ConfigError, match=r"^checkpoint\.resume: .* with seed=1, .* has seed=2; "):
        run(_cfg(tiny_model, out, "seed=2", "checkpoint.resume=true"))
    assert sorted((out / "checkpoints").glob("iter_*")) == kept


@pytest.mark.parametrize(
    "mode, plan, counted",
    [
        # rollout and reward heal in place; a killed policy learner makes the whole run resume
        (
            [
                "train.mode=async",
                "train.max_staleness=2",
                "train.stream_chunks=2",
                "algo.off_policy=tis",
                "algo.tis_cap=2",
            ],
            [(1, 0.1, "rollout", 0), (2, 0.1, "reward", 0), (3, 0.1, "policy", 0)],
            ["restarts/rollout", "restarts/reward", "restarts/auto_resume"],
        ),
    ],
    ids=["async_streamed"],
)
def test_every_mode_heals_and_keeps_its_bounds(tiny_model, tmp_path, monkeypatch, mode, plan, counted):
    """In a pipelined, streamed run the same kills heal: the run ends with every iteration, within its
    staleness bound, finite, each heal counted. (Only sync promises identical metrics: a pipelined batch sent again
    after a rollout restart is generated by the newest weights.)"""
    from rlhf_dist.trainers.ppo import run

    cfg = _cfg(tiny_model, tmp_path / "run", "checkpoint.max_auto_resume=2", *mode)
    with killing(monkeypatch, tmp_path / "run" / "metrics.jsonl", plan) as killer:
        rows = _rows(run(cfg)["metrics_path"])
    assert len(killer.killed) == len(plan)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    bound = cfg.train.max_staleness if cfg.train.mode == "async" else 0
    assert all(0 <= r["staleness"] <= bound for r in rows)
    assert all(math.isfinite(r["policy/loss"]) and math.isfinite(r["critic/value_loss"]) for r in rows)
    assert all(rows[-1][key] >= 1 for key in counted), {k: v for k, v in rows[-1].items() if k.startswith("restarts")}
