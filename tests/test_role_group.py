"""RoleGroup's promises: shards come back in order, a late actor and a dead actor are errors naming role and rank."""

import os
import time

import numpy as np
import pyarrow as pa
import pytest

from rlhf_dist.data import schema as S

pytestmark = pytest.mark.slow


def setup_module(module):
    # Ray's workers cannot import a test module: ship this module's classes by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(module)


class Echo:
    """A plain role: doubles a column, sleeps or dies on request."""

    def __init__(self, rank: int):
        self.rank = rank

    def double(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.array(np.asarray(batch.column(S.SAMPLE_ID)) * 2)], [S.SAMPLE_ID])

    def nap(self, seconds: float) -> int:
        if self.rank == 1:
            time.sleep(seconds)
        return self.rank

    def die(self) -> None:
        if self.rank == 1:
            os._exit(1)

    def die_once(self, marker: str) -> int:
        """Dies the first time any actor of the group is asked (the marker file says it happened), then answers."""
        if self.rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return self.rank

    def stale_once(self, marker: str) -> int:
        from rlhf_dist.comm.errors import StaleStateError

        if self.rank == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            raise StaleStateError("rank 0 lost its state")
        return self.rank

    def stamp(self) -> float:
        return time.time()

    def refuse(self) -> None:
        if self.rank == 2:
            raise ValueError("no reward for an empty response")


def _group(started: list, n: int, timeout_s: float, max_restarts: int = 0):
    """``n`` Echo actors; ``started`` (the ``role_groups`` fixture) stops them after the test."""
    from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, reserve

    pg = reserve("echo", n, 0.5, 0, "PACK", timeout_s=60)
    bundles = Bundles(pg, list(range(n)), 0.5, 0)
    started.append(RoleGroup("echo", Echo, bundles, lambda rank: ((rank,), {}), timeout_s, max_restarts=max_restarts))
    return started[-1]


def test_a_dead_actor_is_restarted_restored_and_its_call_sent_again(role_groups, tmp_path):
    from rlhf_dist.orchestration.role_group import ActorRestartError

    group = _group(role_groups, 3, timeout_s=120, max_restarts=1)
    restored = []
    group.on_restart = restored.append
    before = list(group.ping())
    assert group.call("die_once", str(tmp_path / "died")).get() == [0, 1, 2]
    assert group.restarts == 1 and restored == [1]
    assert group.pids[1] != before[1] and group.pids[::2] == before[::2]
    # an actor that says its state is stale is restored and asked again, and it is no restart
    assert group.call("stale_once", str(tmp_path / "stale")).get() == [0, 1, 2]
    assert group.restarts == 1 and restored == [1, 0]
    # restarts spent: one line naming role, actor and that
    with pytest.raises(ActorRestartError, match=r"^role echo actor 1 is gone: [^\n]*; died with [^\n]*$"):
        group.call("die").get()


def test_a_restart_between_calls_is_seen_in_the_ledger_and_counted_once(role_groups):
    """SIGKILL from outside: an idle actor that Ray restarts fails no call; its ledger report's new pid is what tells.
    A call that was in flight when it died fails afterwards: it is sent again, and the restart is not counted twice."""
    import signal

    import ray

    from rlhf_dist.orchestration.role_group import collect_compute_stats

    group = _group(role_groups, 2, timeout_s=120, max_restarts=2)
    restored = []
    group.on_restart = restored.append
    before = list(group.ping())

    def kill_and_wait(rank: int) -> int:
        old = group.pids[rank]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                pid = ray.get(group.actors[rank].ping.remote(), timeout=10)
                if pid != old:
                    return pid
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"actor {rank} was not restarted")

    collect_compute_stats({"echo": group})  # nothing changed: nothing noticed
    assert group.restarts == 0 and restored == []
    new = kill_and_wait(0)  # idle: no call fails
    assert group.restarts == 0 and group.pids == before
    stats = collect_compute_stats({"echo": group})["echo"]
    assert [s["pid"] for s in stats] == [new, before[1]]
    assert group.restarts == 1 and restored == [0] and group.pids == [new, before[1]]
    collect_compute_stats({"echo": group})
    assert group.restarts == 1 and restored == [0]

    napping = group.call_rank(1, "nap", 3.0)
    time.sleep(1.0)  # it is asleep in nap() when killed
    new1 = kill_and_wait(1)
    collect_compute_stats({"echo": group})  # seen here first, through the ledger
    assert group.restarts == 2 and restored == [0, 1]
    assert napping.get() == [1]  # the call it died in fails, is sent again, and the restart is not counted again
    assert group.restarts == 2 and group.pids == [new, new1]


def test_scatter_gathers_in_order_and_failures_name_the_actor(role_groups):
    from rlhf_dist.data.batch import make_batch
    from rlhf_dist.orchestration.role_group import ActorDiedError, ActorTimeoutError, RoleMethodError

    group = _group(role_groups, 3, timeout_s=120)  # actors start in seconds on a busy 2-core machine
    lengths = np.random.default_rng(0).integers(1, 20, size=11)
    batch = make_batch({S.SAMPLE_ID: np.arange(11), S.PROMPT_IDS: [list(range(k)) for k in lengths]})
    out = group.scatter("double", batch).batch()
    assert out.column(S.SAMPLE_ID).to_pylist() == [2 * i for i in range(11)]
    # chained on another group's shards (3 onto 2 actors, sent before those exist): the same rows, in order
    chained = _group(role_groups, 2, timeout_s=120).chain("double", group.scatter("double", batch))
    assert chained.batch().column(S.SAMPLE_ID).to_pylist() == [4 * i for i in range(11)]

    group.timeout_s = 3
    t0 = time.monotonic()
    with pytest.raises(ActorTimeoutError, match=r"role echo: actor\(s\) \[1\] did not answer nap\(\)"):
        group.call("nap", 8).get()
    assert time.monotonic() - t0 < 15
    # a role method that raises is not a dead actor: its own error type, the exception named
    with pytest.raises(RoleMethodError, match=r"role echo actor 2 raised ValueError in refuse\(\): no reward for"):
        group.call("refuse").get()
    group.timeout_s = 60  # the die() call queues behind actor 1's nap
    with pytest.raises(ActorDiedError, match=r"^role echo actor 1 died in die\(\): [^\n]*$"):
        group.call("die").get()


def test_a_call_sent_after_a_ref_starts_once_it_exists_keeps_its_place_and_fails_with_it(role_groups):
    """``after=``: Ray holds the call until the ref exists (a push landing), later calls to the actor queue behind
    it, and a ref that failed fails the call without running it: the role never sees the keyword."""
    import ray

    from rlhf_dist.orchestration.role_group import RoleMethodError

    @ray.remote(num_cpus=0)
    def landed(seconds: float) -> float:
        time.sleep(seconds)
        return time.time()

    @ray.remote(num_cpus=0)
    def failed() -> None:
        raise ValueError("the push failed")

    group = _group(role_groups, 2, timeout_s=60)
    group.ping()
    group.compute_stats().get()
    ref = landed.remote(1.0)
    held, ledger, behind = group.call("stamp", after=ref), group.compute_stats(after=ref), group.call("stamp")
    at = ray.get(ref)
    started = held.get()
    assert all(t >= at for t in started)  # not before the ref existed
    assert all(b >= s for b, s in zip(behind.get(), started))  # the call sent later ran later
    assert [s["calls"] for s in ledger.get()] == [{"stamp": 1}] * 2  # the ledger after= the ref held the held call

    with pytest.raises(RoleMethodError, match=r"^role echo actor \d raised ValueError in stamp\(\): the push failed"):
        group.call("stamp", after=failed.remote()).get()
    # the call sent behind ran; the void one did not
    assert [s["calls"] for s in group.compute_stats().get()] == [{"stamp": 1}] * 2
