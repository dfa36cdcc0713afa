"""Where an iteration's time goes: the overhead arithmetic against hand-worked numbers, and actors that report it."""

import time

import pytest

from rlhf_dist.orchestration.phases import Phases
from rlhf_dist.orchestration.weight_push import ROLLOUT_UPDATE
from rlhf_dist.trainers import timing


def ppo_chains(push_during_train: bool = False) -> timing.Chains:
    """What trainers/ppo.py::iteration records, written out by hand: the calls of each phase."""
    phases = Phases()
    with phases.phase("generate"):
        phases.record("rollout", "generate")
    with phases.phase("score"):
        for role, method in (
            ("reward", "score"),
            ("reference", "logprobs"),
            ("policy", "logprobs"),
            ("critic", "values"),
        ):
            phases.record(role, method)
    with phases.phase("train"):
        phases.record("policy", "train")
        phases.record("critic", "train")
        if push_during_train:  # queued on the policy's actors behind its training
            phases.record("policy", "push_weights")
            phases.record("rollout", *ROLLOUT_UPDATE, chain="push")
    if not push_during_train:
        with phases.phase("weight_sync"):
            phases.record("policy", "push_weights")
            phases.record("rollout", *ROLLOUT_UPDATE, chain="push")
    return phases.chains()


CHAINS, SYNC_IN_TRAIN = ppo_chains(), ppo_chains(push_during_train=True)

# Two rollout actors, two policy ranks, one of each other role; seconds inside each role method.
STATS = {
    "rollout": [
        {"seconds": {"generate": 1.0, "update_weights": 0.1}, "peak_rss_mb": 400.0},
        {"seconds": {"generate": 1.5, "update_weights": 0.2}, "peak_rss_mb": 450.0},
    ],
    "reward": [{"seconds": {"score": 0.2}, "peak_rss_mb": 300.0}],
    "reference": [{"seconds": {"logprobs": 0.5}, "peak_rss_mb": 420.0}],
    "policy": [
        {"seconds": {"logprobs": 0.6, "train": 2.0, "push_weights": 0.5}, "peak_rss_mb": 500.0, "peak_gpu_mb": 1000.0},
        {"seconds": {"logprobs": 0.7, "train": 1.8, "push_weights": 0.1}, "peak_rss_mb": 520.0, "peak_gpu_mb": 900.0},
    ],
    "critic": [{"seconds": {"values": 0.4, "train": 2.5}, "peak_rss_mb": 510.0}],
}


def test_role_compute_is_max_over_actors_per_phase_summed_over_phases():
    per_role = timing.role_phase_seconds(STATS, CHAINS)
    # rollout: generate max(1.0, 1.5) + weight_sync max(0.1, 0.2)
    assert per_role["rollout"] == pytest.approx({"generate": 1.5, "weight_sync": 0.2})
    # policy: score max(0.6, 0.7), train max(2.0, 1.8), weight_sync max(0.5, 0.1)
    assert per_role["policy"] == pytest.approx({"score": 0.7, "train": 2.0, "weight_sync": 0.5})
    row = timing.iteration_metrics(STATS, 6.0, CHAINS, driver={"advantages": 0.3})
    assert row["compute/rollout"] == pytest.approx(1.7)
    assert row["compute/policy"] == pytest.approx(3.2)
    assert row["compute/critic"] == pytest.approx(2.9)
    assert row["compute/reward"] == pytest.approx(0.2)
    assert row["compute/policy/train"] == pytest.approx(2.0)


def test_critical_path_and_overhead_fraction():
    row = timing.iteration_metrics(STATS, 6.0, CHAINS, driver={"advantages": 0.3})
    # side by side within a phase, a chain in weight sync: generate 1.5; score max(0.2, 0.5, 0.7, 0.4) = 0.7;
    # advantages 0.3 (driver); train max(2.0, 2.5) = 2.5; weight sync: the push 0.5, the rollout's load inside it
    assert row["critical/generate"] == pytest.approx(1.5)
    assert row["critical/score"] == pytest.approx(0.7)
    assert row["critical/train"] == pytest.approx(2.5)
    assert row["critical/weight_sync"] == pytest.approx(0.5)
    assert row["critical/advantages"] == pytest.approx(0.3)
    assert row["compute/critical_path"] == pytest.approx(5.5)
    assert row["overhead_frac"] == pytest.approx(1 - 5.5 / 6.0)  # 1/12
    assert row["time/wall"] == 6.0


def test_peak_memory_is_max_over_a_roles_actors():
    row = timing.iteration_metrics(STATS, 6.0, CHAINS)
    assert row["memory/rollout_peak_mb"] == 450.0
    assert row["memory/policy_peak_mb"] == 520.0
    assert row["memory/policy_gpu_peak_mb"] == 1000.0
    assert "memory/critic_gpu_peak_mb" not in row


def test_unknown_method_is_a_phase_of_its_own():
    stats = {"rollout": [{"seconds": {"generate": 1.0, "evaluate": 0.25}}]}
    row = timing.iteration_metrics(stats, 2.0, CHAINS)
    assert row["critical/rollout.evaluate"] == 0.25
    assert row["compute/critical_path"] == pytest.approx(1.25)
    assert row["overhead_frac"] == pytest.approx(0.375)


def test_phase_overhead_adds_up_to_wall_minus_critical_path():
    row = timing.iteration_metrics(STATS, 6.0, CHAINS, driver={"advantages": 0.3})
    row.update(
        {"time/generate": 1.6, "time/score": 0.9, "time/advantages": 0.3, "time/train": 2.6, "time/weight_sync": 0.55}
    )
    over = timing.phase_overhead(row)
    assert over["generate"] == pytest.approx(0.1)
    assert over["score"] == pytest.approx(0.2)
    assert over["advantages"] == pytest.approx(0.0)
    assert over["train"] == pytest.approx(0.1)
    assert over["weight_sync"] == pytest.approx(0.05)
    assert over["between"] == pytest.approx(6.0 - 5.95)
    assert sum(over.values()) == pytest.approx(6.0 - row["compute/critical_path"])


def toy_role() -> type:
    """A plain role: ``work`` calls another public method, which must not be counted a second time. Defined in a
    function so that Ray ships the class by value (workers cannot import this test module)."""

    class Toy:
        def work(self, seconds: float) -> str:
            time.sleep(seconds)
            return self.helper()

        def helper(self) -> str:
            time.sleep(0.01)
            return "done"

        def spin(self, seconds: float) -> str:
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass
            return "spun"

    return Toy


def test_timed_role_in_process_counts_the_outermost_call_only():
    from rlhf_dist.orchestration.role_group import timed_role

    Toy = toy_role()
    toy = timed_role(Toy)()
    assert isinstance(toy, Toy) and type(toy).__name__ == "Toy"
    assert toy.work(0.02) == "done"
    stats = toy.compute_stats()
    assert stats["calls"] == {"work": 1}
    assert stats["seconds"]["work"] >= 0.03
    assert stats["peak_rss_mb"] > 0
    assert toy.compute_stats()["seconds"] == {}  # reset by the first report


def test_actor_reports_compute_time(role_groups):
    from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, collect_compute_stats, reserve

    pg = reserve("toy", 2, 1, 0, "PACK", timeout_s=60)
    group = RoleGroup("toy", toy_role(), Bundles(pg, [0, 1], 1, 0), lambda rank: ((), {}), timeout_s=60)
    role_groups.append(group)
    assert group.call("work", 0.05).get() == ["done", "done"]
    stats = collect_compute_stats({"toy": group})["toy"]
    assert len(stats) == 2
    for s in stats:
        assert s["calls"] == {"work": 1}
        assert 0.06 <= s["seconds"]["work"] < 5.0
        assert s["peak_rss_mb"] > 0
    row = timing.iteration_metrics({"toy": stats}, 10.0, CHAINS)
    assert row["compute/toy"] == pytest.approx(max(s["seconds"]["work"] for s in stats))
    assert collect_compute_stats({"toy": group})["toy"][0]["seconds"] == {}  # reset per report
    # CPU time: a sleeping method burns none, a spinning one what it spun; the process's CPU outside its methods
    # (Ray's) is reported beside them and is never negative
    group.call("work", 0.05).get()
    group.call("spin", 0.2).get()
    for s in collect_compute_stats({"toy": group})["toy"]:
        assert s["cpu_seconds"]["work"] < 0.03
        assert 0.2 <= s["cpu_seconds"]["spin"] < 0.5
        assert 0.0 <= s["outside_cpu_s"] < 1.0


def test_a_late_actor_is_named(role_groups):
    from rlhf_dist.orchestration.role_group import ActorTimeoutError, Bundles, RoleGroup, reserve

    pg = reserve("slow", 1, 1, 0, "PACK", timeout_s=60)
    group = RoleGroup("slow", toy_role(), Bundles(pg, [0], 1, 0), lambda rank: ((), {}), timeout_s=60)
    role_groups.append(group)
    group.call("helper").get()  # started
    group.timeout_s = 0.5
    with pytest.raises(ActorTimeoutError, match=r"role slow: actor\(s\) \[0\] did not answer work\(\) within"):
        group.call("work", 3.0).get()


def test_the_learners_push_contains_the_rollouts_load():
    # learner rank 0 drives the rollout's update from inside push_weights: the longer of the two chains counts
    stats = {
        "policy": [{"seconds": {"push_weights": 0.5}}],
        "rollout": [{"seconds": {"start_weight_update": 0.01, "update_weights": 0.3, "finish_weight_update": 0.05}}],
    }
    assert timing.critical_seconds(stats, CHAINS) == pytest.approx({"weight_sync": 0.5})


@pytest.mark.parametrize("critic_train, critical_train", [(2.2, 2.3), (2.6, 2.6)])
def test_sync_queued_behind_the_policy_training_is_part_of_the_train_phase(critic_train, critical_train):
    stats = {
        "policy": [{"seconds": {"train": 2.0, "push_weights": 0.3}}],
        "rollout": [{"seconds": {"update_weights": 0.2}}],
        "critic": [{"seconds": {"train": critic_train}}],
    }
    # policy train 2.0 -> push 0.3 (the rollout's load of 0.2 inside it) = 2.3, side by side with the critic
    assert timing.critical_seconds(stats, SYNC_IN_TRAIN) == pytest.approx({"train": critical_train})
    row = timing.iteration_metrics(stats, 3.0, SYNC_IN_TRAIN)
    assert row["compute/policy"] == pytest.approx(2.3)  # its train phase: train + push
    assert row["overhead_frac"] == pytest.approx(1 - critical_train / 3.0)
    assert "critical/weight_sync" not in row
    # the same calls with the push after the train phase: max(2.0, critic) + max(0.3, 0.2)
    assert timing.critical_seconds(stats, CHAINS) == pytest.approx(
        {"train": max(2.0, critic_train), "weight_sync": 0.3}
    )


# -- tokens/s per device (NeMo-RL's end-to-end Tokens/sec/GPU) --------------------------------------------------------
def token_batch():
    import pyarrow as pa

    from rlhf_dist.data import schema as S

    return pa.record_batch(
        {
            S.PROMPT_IDS: pa.array(
                [[1, 2, 3], [1, 2, 3], [4]], type=S.TOKENS
            ),  # one prompt answered twice counts twice
            S.RESPONSE_IDS: pa.array([[5, 6], [], [7, 8, 9, 10]], type=S.TOKENS),
        }
    )


def test_batch_tokens_are_prompt_plus_response_per_sample():
    assert timing.batch_tokens(token_batch()) == (3 + 3 + 1) + (2 + 0 + 4)  # 13


def test_tokens_per_device_second_by_hand():
    row = timing.tokens_per_device_s(1200, 0.5, "gpu", 4)
    assert row == {"throughput/tokens_per_s_per_gpu": 600.0, "throughput/gpus": 4.0}  # 1200 / (0.5 x 4)
    assert timing.tokens_per_device_s(90, 3.0, "cpu", 5)["throughput/tokens_per_s_per_cpu"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="at least one device"):
        timing.tokens_per_device_s(10, 1.0, "cpu", 0)


def test_devices_are_the_roles_gpus_else_their_cpus():
    from rlhf_dist.config.schema import RoleConfig, RolesConfig

    assert timing.run_devices(RolesConfig()) == ("cpu", 5)  # one CPU per role, no GPU
    gpu = RolesConfig(
        rollout=RoleConfig(num_actors=2, num_gpus=1),
        reward=RoleConfig(num_gpus=0.5),  # a share of a GPU is still a device
        reference=RoleConfig(colocate_with="policy"),  # on the policy's GPUs: not counted again
        policy=RoleConfig(num_actors=2, num_gpus=1),
        critic=RoleConfig(num_actors=0),
    )
    assert timing.run_devices(gpu) == ("gpu", 5)  # 2 + 0.5 + 2, rounded up
    # the driver's call: 13 tokens in 0.25 s on 4 CPUs (no critic) = 13 tokens/s per CPU
    row = timing.throughput(timing.batch_tokens(token_batch()), 0.25, RolesConfig(critic=RoleConfig(num_actors=0)))
    assert row == {"throughput/tokens_per_s_per_cpu": pytest.approx(13.0), "throughput/cpus": 4.0}


def test_cpu_columns_sum_over_actors_and_the_driver():
    stats = {
        "rollout": [
            {"cpu_seconds": {"generate": 1.0, "update_weights": 0.1}, "outside_cpu_s": 0.05},
            {"cpu_seconds": {"generate": 1.2}, "outside_cpu_s": 0.07},
        ],
        "critic": [{"cpu_seconds": {"values": 0.4, "train": 2.0}, "outside_cpu_s": 0.08}],
        "hybrid_view": [{"cpu_seconds": {"generate": 0.5}}],  # a view: its process's CPU is its owner's
    }
    row = timing.cpu_metrics(stats, driver_cpu_s=0.5, driver_math_cpu_s=0.1)
    assert row["cpu/rollout"] == pytest.approx(2.3)  # CPU adds up over actors where wall time takes the max
    assert row["cpu/rollout_outside"] == pytest.approx(0.12)
    assert row["cpu/critic"] == pytest.approx(2.4)
    assert row["cpu/critic_outside"] == pytest.approx(0.08)
    assert row["cpu/hybrid_view"] == pytest.approx(0.5)
    assert "cpu/hybrid_view_outside" not in row
    assert row["cpu/driver"] == pytest.approx(0.4)
    assert row["cpu/driver_math"] == pytest.approx(0.1)
    # orchestration: the driver without its math and the actors outside their methods, of everything
    total = 2.3 + 0.12 + 2.4 + 0.08 + 0.5 + 0.4 + 0.1
    assert row["cpu/orchestration_frac"] == pytest.approx((0.4 + 0.12 + 0.08) / total)


def test_a_view_reports_its_methods_cpu_and_leaves_the_process_to_its_owner():
    from rlhf_dist.orchestration.role_group import _only

    both = {
        "seconds": {"generate": 1.0, "train": 2.0},
        "cpu_seconds": {"generate": 0.9, "train": 1.9},
        "outside_cpu_s": 0.2,
    }
    view = _only(both, lambda m: m == "generate", whole_process=False)
    owner = _only(both, lambda m: m != "generate")
    assert view["cpu_seconds"] == {"generate": 0.9} and "outside_cpu_s" not in view
    assert owner["cpu_seconds"] == {"train": 1.9} and owner["outside_cpu_s"] == 0.2


def test_the_driver_phases_record_their_own_cpu():
    phases = Phases()
    with phases.phase("advantages", on_driver=True):
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
    with phases.phase("train"):
        time.sleep(0.02)
    assert set(phases.driver_cpu) == {"advantages"}
    assert 0.05 <= phases.driver_cpu["advantages"] < 0.5
