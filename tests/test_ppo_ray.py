"""End to end on real local Ray: five roles as actors, Arrow through the object store, weights synced every
iteration."""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_ppo_zero3_two_learners_two_rollouts(tiny_cfg, local_ray, monkeypatch):
    """Two ZeRO-3 learners gather, the object store carries one copy, both rollout actors load it every iteration:
    at the end both hold the last version, bit for bit the final policy saved in Hugging Face format."""
    from contextlib import contextmanager

    from rlhf_dist.models.load import load_causal_lm
    from rlhf_dist.orchestration import launch
    from rlhf_dist.trainers import ppo

    held = []

    @contextmanager
    def running_roles(cfg):  # what the rollout actors hold once the run is done, before they stop
        with launch.running_roles(cfg) as groups:
            yield groups
            held.append((groups["rollout"].call("get_version").get(), groups["rollout"].call("weights").get()))

    monkeypatch.setattr(ppo, "running_roles", running_roles)
    cfg = tiny_cfg(
        "train.iterations=3",
        "train.prompts_per_iteration=8",
        "generation.max_new_tokens=6",
        "train.engine=deepspeed",
        "train.zero_stage=3",
        "roles.policy.num_actors=2",
        "roles.rollout.num_actors=2",
        "roles.critic.num_actors=1",
        "ray.num_cpus=null",
        "logging.plot=false",
    )
    summary = ppo.run(cfg)
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    # the engines ran the learner's weights: log-probs agree right after every sync
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows)
    assert all(np.isfinite(r["policy/loss"]) and np.isfinite(r["critic/value_loss"]) for r in rows)

    ((versions, engines),) = held
    assert versions == [3, 3]  # the push after the last iteration's training
    saved = dict(load_causal_lm(summary["policy_path"]).named_parameters())
    for weights in engines:
        assert set(weights) == set(saved)
        for n, w in weights.items():
            np.testing.assert_array_equal(w, saved[n].detach().numpy())


def test_engines_start_first_and_sleep_while_learners_train(tiny_cfg, local_ray):
    """Sleep mode's contract, read off the actors' own timelines: the rollout engines are up and asleep before any
    other role starts; after generating they sleep, and wake only for the push that follows the learners' training."""
    from rlhf_dist.orchestration.launch import running_roles
    from rlhf_dist.orchestration.phases import Phases
    from rlhf_dist.orchestration.role_group import collect_compute_stats
    from rlhf_dist.trainers.ppo import PPORun, close_iteration, iteration, prepare

    cfg = tiny_cfg(
        "generation.enable_sleep=true",
        "train.prompts_per_iteration=4",
        "generation.max_new_tokens=4",
        "ray.num_cpus=null",
    )
    sampler = prepare(cfg)
    with running_roles(cfg) as groups:
        run = PPORun.start(cfg, groups, sampler)
        spans = _spans(collect_compute_stats(groups))
        asleep = spans["rollout"]["sleep"][0][1]
        for role in ("reward", "reference", "policy", "critic"):
            assert spans[role]["__init__"][0][0] >= asleep, f"{role} started before the engines were up and asleep"
        for _ in range(2):
            iteration(run, Phases())
            spans = _spans(collect_compute_stats(groups, close_iteration(run)))  # the ledgers as a run reads them
            ((_, generated),) = spans["rollout"]["generate"]
            ((_, slept),) = spans["rollout"]["sleep"]
            ((woke, _),) = spans["rollout"]["start_weight_update"]
            trains = [s for role in ("policy", "critic") for s in spans[role]["train"]]
            assert generated <= slept and all(slept <= start and end <= woke for start, end in trains)


def test_streamed_parts_are_scored_while_the_rest_still_generates(tiny_cfg, local_ray):
    """train.stream_chunks=3: each of 2 rollout actors generates its share in 3 calls; reward, reference, critic and
    the policy's old log-probs start on the first finished part before the last one is generated; the parts put
    back together train as one batch."""
    from rlhf_dist.orchestration.launch import running_roles
    from rlhf_dist.orchestration.phases import Phases
    from rlhf_dist.orchestration.role_group import collect_compute_stats
    from rlhf_dist.trainers import ppo

    cfg = tiny_cfg(
        "train.stream_chunks=3",
        "train.recompute_old_logprobs=always",
        "train.prompts_per_iteration=12",
        "generation.max_new_tokens=8",
        "roles.rollout.num_actors=2",
        "ray.num_cpus=null",
    )
    sampler = ppo.prepare(cfg)
    with running_roles(cfg) as groups:
        run = ppo.PPORun.start(cfg, groups, sampler)
        collect_compute_stats(groups)
        row = ppo.iteration(run, Phases())
        spans = _spans(collect_compute_stats(groups, ppo.close_iteration(run)))
    assert len(spans["rollout"]["generate"]) == 6
    last_generated = max(end for _, end in spans["rollout"]["generate"])
    for role, method in (("reward", "score"), ("reference", "logprobs"), ("critic", "values"), ("policy", "logprobs")):
        assert len(spans[role][method]) == 6 and min(s for s, _ in spans[role][method]) < last_generated, role
    assert row["logprob_checked_samples"] == 12 and row["logprob_mismatch"] < 1e-3
    assert np.isfinite(row["policy/loss"]) and np.isfinite(row["critic/value_loss"])


def test_hybrid_engine_generates_inside_the_policy_learners(tiny_cfg, local_ray):
    """generation.hybrid_engine=true with 2 ZeRO-3 policy learners: no rollout actors of their own, each learner
    generates with its own engine, and every push (a gather on both ranks, then a copy in memory) gives both
    engines the learners' weights: their log-probs match the learners' after every sync."""
    from rlhf_dist.orchestration.launch import running_roles
    from rlhf_dist.orchestration.phases import Phases
    from rlhf_dist.orchestration.role_group import collect_compute_stats
    from rlhf_dist.trainers import ppo

    cfg = tiny_cfg(
        "generation.hybrid_engine=true",
        "train.recompute_old_logprobs=always",
        "train.engine=deepspeed",
        "train.zero_stage=3",
        "train.prompts_per_iteration=8",
        "generation.max_new_tokens=6",
        "roles.policy.num_actors=2",
        "roles.rollout.num_actors=2",
        "ray.num_cpus=null",
    )
    sampler = ppo.prepare(cfg)
    with running_roles(cfg) as groups:
        assert groups["rollout"].actors is groups["policy"].actors
        run = ppo.PPORun.start(cfg, groups, sampler)
        assert run.sync.name == "in_process"
        collect_compute_stats(groups)
        rows = [ppo.iteration(run, Phases()) for _ in range(3)]
        stats = collect_compute_stats(groups)
        assert groups["rollout"].call("get_version").get() == [3, 3]
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    assert all(r["logprob_checked_samples"] == 8 and r["logprob_mismatch"] < 1e-3 for r in rows)
    assert all(r["weight_sync_bytes"] > 0 for r in rows)
    # the same processes report generation under rollout and training under policy
    assert {m for s in stats["rollout"] for m in s["seconds"]} <= {"generate", "get_version"}
    assert "generate" not in {m for s in stats["policy"] for m in s["seconds"]}


def _spans(stats: dict) -> dict:
    """{role: {method: [(start, end), ...]}} over all actors of the role."""
    out: dict = {}
    for role, actors in stats.items():
        for actor in actors:
            for method, start, end in actor["spans"]:
                out.setdefault(role, {}).setdefault(method, []).append((start, end))
    return out


def _pipelined(tiny_cfg, *extra):
    """A pipelined run's config: 2 rollout actors, 2 ZeRO-2 learners, a checkpoint every 2 iterations."""
    return tiny_cfg(
        "train.prompts_per_iteration=8",
        "generation.max_new_tokens=6",
        "roles.policy.num_actors=2",
        "roles.rollout.num_actors=2",
        "ray.num_cpus=null",
        "logging.plot=false",
        "checkpoint.save_every=2",
        "checkpoint.save_final=false",
        *extra,
    )


def test_one_step_off_trains_on_samples_one_version_behind_and_resumes(tiny_cfg, local_ray):
    """train.mode=one_step_off with 2 rollout actors and 2 ZeRO-2 learners: after the first iteration every batch
    was generated while the previous one trained (one version behind), the log-prob alarm runs where versions match,
    and a resume redraws the prompts whose generation was in flight at the checkpoint."""
    from rlhf_dist.checkpoint import load_driver_state
    from rlhf_dist.trainers.ppo import run

    def cfg(*extra):
        return _pipelined(tiny_cfg, "train.mode=one_step_off", "algo.off_policy=tis", "algo.tis_cap=2.0", *extra)

    rows = [json.loads(line) for line in open(run(cfg("train.iterations=2"))["metrics_path"])]
    assert [r["policy_version"] for r in rows] == [0, 1]
    assert [r["staleness"] for r in rows] == [0, 1]
    assert rows[0]["logprob_checked_samples"] == 8 and rows[0]["logprob_mismatch"] < 1e-3
    assert rows[1]["logprob_checked_samples"] == 0 and rows[1]["policy/behav_kl"] > 0
    state = load_driver_state(Path(cfg().output_dir) / "checkpoints" / "iter_2")
    assert state["sampler"]["position"] == 2 * 8  # iteration 2's prompts, in flight when saved, are drawn again

    rows = [json.loads(line) for line in open(run(cfg("train.iterations=4", "checkpoint.resume=true"))["metrics_path"])]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [r["staleness"] for r in rows[2:]] == [0, 1]  # regenerated on the resumed weights, then one behind
    assert all(np.isfinite(r["policy/loss"]) and np.isfinite(r["critic/value_loss"]) for r in rows)


def test_async_bounds_staleness_with_a_slow_learner_checks_pushed_weights_and_resumes(tiny_cfg, local_ray):
    """train.mode=async, max_staleness=2, 2 rollout actors and 2 ZeRO-2 learners made slow (2 epochs of 2 steps):
    generation runs two batches ahead and then waits, so samples reach the learners 0, 1, 2 versions old and never
    older; every sync.check_every=3 iterations both engines and the policy score a sample right after the push,
    without draining the pipeline; a resume regenerates what was in flight from the checkpoint's weights."""
    from rlhf_dist.trainers.ppo import run

    def cfg(*extra):
        slow_learner = ("train.ppo_epochs=2", "train.mini_batches=2")
        return _pipelined(
            tiny_cfg,
            "train.mode=async",
            "train.max_staleness=2",
            "algo.off_policy=icepop",
            "sync.check_every=3",
            *slow_learner,
            *extra,
        )

    rows = [json.loads(line) for line in open(run(cfg("train.iterations=3"))["metrics_path"])]
    assert [r["staleness"] for r in rows] == [0, 1, 2]
    assert [r["policy_version"] for r in rows] == [0, 1, 2]
    assert [r["logprob_checked_samples"] for r in rows] == [8, 0, 0]

    rows = [json.loads(line) for line in open(run(cfg("train.iterations=6", "checkpoint.resume=true"))["metrics_path"])]
    assert [r["iteration"] for r in rows] == list(range(6))
    # resumed at 2: regenerated on the checkpoint's weights (the old log-prob pass compares all 8); then the buffer
    # fills again, and at 3 the engines and the policy score 2 of the 8 samples (an eighth, one per learner) after
    # the push
    assert [r["staleness"] for r in rows[2:]] == [0, 1, 2, 2]
    assert [r["logprob_checked_samples"] for r in rows[2:]] == [8, 2, 0, 0]
    assert ["compute/rollout/engine_logprobs" in r for r in rows] == [False, False, False, True, False, False]
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows if r["logprob_checked_samples"])
    assert all(np.isfinite(r["policy/loss"]) and np.isfinite(r["critic/value_loss"]) for r in rows)


@pytest.mark.parametrize(
    "mode",
    [["train.mode=sync"], ["train.mode=one_step_off", "algo.off_policy=tis", "algo.tis_cap=2.0"]],
    ids=["sync", "one_step_off"],
)
def test_grpo_without_critic_skips_the_old_logprob_pass(tiny_cfg, local_ray, mode):
    """GRPO (no critic actors) with one optimizer step per batch (train.recompute_old_logprobs=auto): the policy
    actors compute log-probs only for the stale-weight alarm, every sync.check_every=2 iterations, on an eighth of
    the batch (one_step_off: after iteration 0, beside the rollout engine after the push, so its pipeline never
    drains); the loss takes the learner's own (ratio 1), also as the proximal policy of one_step_off's correction,
    and the run still learns."""
    import math

    from rlhf_dist.trainers.ppo import run

    cfg = tiny_cfg(
        *mode,
        "train.iterations=4",
        "train.prompts_per_iteration=8",
        "generation.max_new_tokens=6",
        "train.ppo_epochs=1",
        "train.mini_batches=1",
        "sync.check_every=2",
        "logging.plot=false",
        path="configs/grpo_tiny_cpu.yaml",
    )
    assert cfg.train.skips_old_logprobs(cfg.algo) and cfg.roles.critic.num_actors == 0
    rows = [json.loads(line) for line in open(run(cfg)["metrics_path"])]
    assert "critic/value_loss" not in rows[0]
    assert [r["policy_version"] for r in rows] == [0, 1, 2, 3]
    assert ["compute/policy/logprobs" in r for r in rows] == [True, False, True, False]
    assert [r["logprob_checked_samples"] for r in rows] == [4, 0, 4, 0]  # 8 prompts x 4 samples / 8
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows[::2]) and all(
        math.isnan(r["logprob_mismatch"]) for r in rows[1::2]
    )
    assert all(np.isfinite(r["policy/loss"]) and r["policy/grad_norm"] > 0 for r in rows)
    assert all(r["policy/ratio_mean"] == 1.0 and r["policy/approx_kl"] == 0.0 for r in rows)
    pipelined = cfg.train.mode == "one_step_off"
    assert [r["staleness"] for r in rows] == ([0, 1, 1, 1] if pipelined else [0, 0, 0, 0])
    scored_after_push = ["compute/rollout/engine_logprobs" in r for r in rows]
    assert scored_after_push == ([False, False, True, False] if pipelined else [False] * 4)
    if pipelined:  # the stale batches are weighted from the engine's (behaviour) policy to the learner's
        assert all(r["policy/behav_kl"] > 0 for r in rows[1:])


def test_default_job_learns(tiny_model, tmp_path, capfd):
    """The embedded default through the CLI, shortened: it starts its own local Ray and the gold reward rises."""
    from rlhf_dist.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "configs/tiny_cpu.yaml",
            f"model.policy={tiny_model}",
            f"output_dir={out}",
            "train.iterations=30",
            "logging.progress_bar=false",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first = np.mean([r["gold_reward_mean"] for r in rows[:5]])
    last = np.mean([r["gold_reward_mean"] for r in rows[-5:]])
    assert last > first + 0.15, (first, last)
    # every row's ledgers hold that iteration's calls: each role's work is in it once, none lost between rows
    calls = ("rollout/generate", "reward/score", "reference/logprobs", "critic/values", "policy/train", "critic/train")
    assert all(r[f"compute/{call}"] > 0 for r in rows for call in calls)
    # the same iteration in CPU time: the model's compute on the actors, Ray's outside their methods, the driver's
    for r in rows[1:]:  # the first row's driver CPU includes the start of its loop
        assert r["cpu/policy"] > r["cpu/reward"] > 0 and r["cpu/critic"] > 0
        assert all(r[f"cpu/{role}_outside"] >= 0 for role in ("rollout", "reward", "reference", "policy", "critic"))
        assert r["cpu/driver"] > 0 and r["cpu/driver_math"] > 0
        assert 0 < r["cpu/orchestration_frac"] < 1
    assert (out / "reward_kl.png").stat().st_size > 0
    assert (out / "policy" / "config.json").exists()
    printed = capfd.readouterr().out  # the driver is a child of `rlhf-dist train` (supervise.py)
    assert "gold reward:" in printed and str(out / "policy") in printed


def test_only_vllm_or_sleeping_engines_start_before_the_other_roles(tiny_cfg):
    from rlhf_dist.orchestration.launch import engines_start_first

    assert not engines_start_first(tiny_cfg())  # Hugging Face engines: every role starts at once
    assert engines_start_first(tiny_cfg("generation.enable_sleep=true"))
    assert engines_start_first(tiny_cfg("generation.engine=vllm", "generation.vllm_cpu=true"))
