"""Resume gives the same next iterations as not stopping: learner, optimizer, data position, KL and RNG states."""

import json

import pytest

pytestmark = pytest.mark.slow


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_resume_matches_uninterrupted_run(tiny_model, tmp_path, local_ray):
    from rlhf_dist.checkpoint import checkpoint_identity
    from rlhf_dist.config import ConfigError, load_config
    from rlhf_dist.trainers.ppo import run

    def cfg(out, *extra):
        return load_config(
            "configs/tiny_cpu.yaml",
            [
                f"model.policy={tiny_model}",
                f"output_dir={out}",
                "logging.progress_bar=false",
                "logging.plot=false",
                "train.prompts_per_iteration=16",
                "generation.max_new_tokens=8",
                "checkpoint.save_every=2",
                "checkpoint.save_final=false",
                "ray.num_cpus=null",
                "algo.kl_target=0.05",
                *extra,
            ],
        )

    straight = _rows(run(cfg(tmp_path / "a", "train.iterations=4"))["metrics_path"])
    run(cfg(tmp_path / "b", "train.iterations=2"))
    resumed = _rows(run(cfg(tmp_path / "b", "train.iterations=4", "checkpoint.resume=true"))["metrics_path"])
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight[2:], resumed[2:]):
        for key in ("reward_mean", "kl", "kl_coef", "policy/loss", "critic/value_loss", "policy_version"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key

    # One run in b, twice started; its checkpoints name it. Another run cannot start over it or resume it as its own:
    # both are refused before any actor starts, and b is left as it was.
    manifest = json.loads((tmp_path / "b" / "run.json").read_text())
    assert len(manifest["attempts"]) == 2
    kept = sorted((tmp_path / "b" / "checkpoints").glob("iter_*"))
    assert [p.name for p in kept] == ["iter_2", "iter_4"]
    assert {checkpoint_identity(p)["run_id"] for p in kept} == {manifest["run_id"]}
    with pytest.raises(ConfigError, match=r"^output_dir: .* holds checkpoints, metrics\.jsonl of run "):
        run(cfg(tmp_path / "b", "train.iterations=4"))
    with pytest.raises(ConfigError, match=r"^checkpoint\.resume: .* with seed=1, .* has seed=2; "):
        run(cfg(tmp_path / "b", "train.iterations=6", "seed=2", "checkpoint.resume=true"))
    assert sorted((tmp_path / "b" / "checkpoints").glob("iter_*")) == kept
    assert _rows(tmp_path / "b" / "metrics.jsonl") == resumed
