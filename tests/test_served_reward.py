"""`reward.serve`: the reward model as a Ray Serve application on local Ray. It scores what the in-actor reward model
scores, a second job shares it (and refuses one serving another model), it is deleted by the job that started it, and
a short PPO job scored through it gives the in-actor run's rewards."""

import json
import sys

import numpy as np
import pytest

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.data import schema as S
from rlhf_dist.trainers.timing import TIMING_PREFIXES

NOT_COMPARED = TIMING_PREFIXES


@pytest.fixture
def serve_ray(local_ray):
    """Local Ray with Serve shut down afterwards, also when the test fails (local_ray then stops Ray)."""
    from ray import serve

    try:
        yield serve
    finally:
        serve.shutdown()


def reward_cfg(tiny_cfg, tiny_model, *overrides):
    return tiny_cfg(
        "reward.function=null",
        f"model.reward={tiny_model}",
        "train.prompts_per_iteration=4",
        "generation.samples_per_prompt=2",
        "generation.max_new_tokens=6",
        *overrides,
    )


def test_bad_settings_are_one_line_naming_the_key(tiny_cfg, tiny_model):
    from rlhf_dist.orchestration.reward_serve import deploy

    with pytest.raises(ConfigError, match=r"^reward.serve.max_replicas: 1 < reward.serve.replicas=2.*set it >= "):
        tiny_cfg("reward.serve.replicas=2", "reward.serve.max_replicas=1")
    with pytest.raises(ConfigError, match=r"^reward.serve.num_cpus: .* out of range"):
        tiny_cfg("reward.serve.num_cpus=-1")
    with pytest.raises(ConfigError, match=r"^model.reward: not set, but reward.serve serves the reward model; set "):
        deploy(tiny_cfg("reward.serve.enabled=true"), reserved={})
    assert load_config("configs/tiny_cpu.yaml").reward.serve.enabled is False


def test_without_ray_serve_installed_the_error_names_the_extra(monkeypatch):
    from rlhf_dist.engines.served_reward import import_serve

    monkeypatch.setitem(sys.modules, "ray.serve", None)  # what Python does for a package that is not there
    with pytest.raises(
        ConfigError,
        match=r"^reward.serve.enabled: true, but Ray Serve does not import \(no module "
        r"'ray.serve'\); pip install 'rlhf_dist\[serve\]'$",
    ):
        import_serve()


def test_serve_reward_command_without_a_reward_model_is_one_line_before_ray_starts(tiny_model, capsys):
    from rlhf_dist.cli import main

    assert main(["serve-reward", "configs/tiny_cpu.yaml", f"model.policy={tiny_model}"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "rlhf-dist: error: model.reward: not set, but reward.serve serves the reward model; set "
        "model.reward=PATH (or reward.serve.enabled=false)\n"
    )
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.slow  # local Ray and Serve: about 30 s
def test_served_scores_equal_the_in_actor_model_and_a_second_job_shares_it(tiny_cfg, tiny_model, serve_ray):
    from rlhf_dist.engines.served_reward import ServedReward, ServedRewardError
    from rlhf_dist.orchestration.reward_serve import deploy, served_reward
    from rlhf_dist.trainers.ppo import prepare
    from rlhf_dist.workers.reward import RewardWorker
    from rlhf_dist.workers.rollout import RolloutWorker

    cfg = reward_cfg(tiny_cfg, tiny_model)
    batch = RolloutWorker(cfg).generate(prepare(cfg).next_batch(), iteration=0)
    assert len(batch) == 8 and len(set(batch.column(S.RESPONSE_TEXT).to_pylist())) > 1
    in_actor = RewardWorker(cfg).score(batch).column(S.REWARD).to_numpy()

    served_cfg = reward_cfg(
        tiny_cfg, tiny_model, "reward.serve.enabled=true", "reward.serve.replicas=2", "reward.serve.batch_size=3"
    )
    name = served_cfg.reward.serve.name
    with served_reward(served_cfg, reserved={"CPU": 5}):
        (deployment,) = serve_ray.status().applications[name].deployments.values()
        assert deployment.replica_states == {"RUNNING": 2}
        worker = RewardWorker(served_cfg)
        assert worker.model is None  # the role loads no model of its own
        served = worker.score(batch).column(S.REWARD).to_numpy()
        np.testing.assert_allclose(served, in_actor, rtol=1e-5, atol=1e-6)
        # the rows come back in the batch's order whatever the split: reversed rows, reversed scores
        np.testing.assert_allclose(worker.model_scores(batch.take(np.arange(7, -1, -1))), served[::-1], atol=1e-6)

        assert deploy(served_cfg, reserved={}) is False  # a second job finds it running and shares it
        with pytest.raises(ConfigError, match=r"^reward.serve.name: 'rlhf_reward' is running with .*\(float32\), not"):
            deploy(reward_cfg(tiny_cfg, tiny_model, "reward.serve.enabled=true", "model.dtype=bfloat16"), {})
    assert name not in serve_ray.status().applications  # deleted by the job that started it

    with pytest.raises(ServedRewardError, match=r"^reward.serve.name='rlhf_reward': no such Serve application"):
        ServedReward(name, batch_size=4, timeout_s=5)
    with pytest.raises(ConfigError, match=r"^reward.serve.num_cpus: 2 replicas x 1 = 2 CPUs, but Ray has 1 free"):
        deploy(served_cfg, reserved={"CPU": serve_ray_cpus() - 1})


def serve_ray_cpus() -> float:
    import ray

    return ray.available_resources()["CPU"]


@pytest.mark.slow
def test_ppo_job_scored_by_the_served_model_matches_the_in_actor_run(tiny_cfg, tiny_model, serve_ray, tmp_path):
    """Two GRPO iterations with the reward model served (2 replicas) and in the reward actor: the same seed gives the
    same rewards, so the served run was scored by the same model on the same samples; the job deletes its app."""
    from rlhf_dist.trainers.ppo import run

    common = (
        "train.iterations=2",
        "train.engine=torch",
        "train.ppo_epochs=1",
        "train.mini_batches=1",
        "algo.estimator=grpo",
        "roles.critic.num_actors=0",
        "ray.num_cpus=null",
        "logging.plot=false",
        "checkpoint.save_final=false",
    )
    rows = {}
    for served in (False, True):
        cfg = reward_cfg(
            tiny_cfg,
            tiny_model,
            *common,
            f"reward.serve.enabled={str(served).lower()}",
            "reward.serve.replicas=2",
            "reward.serve.batch_size=3",
            f"output_dir={tmp_path / str(served)}",
        )
        summary = run(cfg)
        rows[served] = [json.loads(line) for line in open(summary["metrics_path"])]
    assert len(rows[True]) == 2
    for a, b in zip(
        rows[False], rows[True]
    ):  # rewards, then what they drive: advantages, losses, iteration 2's samples
        keys = sorted(k for k in a if not k.startswith(NOT_COMPARED) and isinstance(a[k], float))
        assert {"reward_mean", "reward_std", "policy/loss", "kl"} <= set(keys)
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5, nan_ok=True), (a["iteration"], key)
    assert serve_ray.status().applications == {}
