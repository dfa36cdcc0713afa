"""The whole pipeline through the CLI on real local Ray, shortened: SFT -> collect -> RM -> PPO and DPO -> table.

Two learner actors per offline stage (one DeepSpeed ZeRO-2 group over gloo), two rollout actors and two labellers,
so every group really scatters and gathers.
"""

import json

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

SHORT = [
    "sft.demonstrations=1000",
    "sft.learners.num_actors=2",
    "collect.num_prompts=384",
    "collect.chunk_prompts=128",
    "collect.labellers.num_actors=2",
    "roles.rollout.num_actors=2",
    "rm.eval_fraction=0.2",
    "rm.learners.num_actors=2",
    "train.iterations=12",
    "train.prompts_per_iteration=32",
    "dpo.epochs=2",
    "dpo.learners.num_actors=2",
    "data.eval_prompts=32",
    "pipeline.eval_samples=2",
    "ray.num_cpus=null",
]


def test_pipeline_end_to_end(tiny_model, tmp_path, local_ray, capsys):
    from rlhf_dist.cli import main
    from rlhf_dist.data.datasets import DatasetSpec, load_table
    from rlhf_dist.models.load import load_causal_lm, load_reward_model

    out = tmp_path / "run"
    rc = main(["pipeline", "configs/pipeline_tiny_cpu.yaml", f"model.policy={tiny_model}", f"output_dir={out}", *SHORT])
    assert rc == 0
    table = json.loads((out / "pipeline.json").read_text())
    p = table["policies"]
    assert set(p) == {"base", "sft", "ppo", "dpo"}
    # SFT learned the demonstrations; PPO and DPO start from it and stay well above the random base model.
    assert p["sft"]["gold_sampled"] > p["base"]["gold_sampled"] + 0.3, p
    assert p["ppo"]["gold_sampled"] > p["base"]["gold_sampled"] + 0.3, p
    assert p["dpo"]["gold_sampled"] > p["base"]["gold_sampled"] + 0.3, p
    # KL to SFT: zero for SFT itself (the sampler's and the reference's log-probs agree), largest for the base model.
    assert abs(p["sft"]["kl_to_sft"]) < 1e-3
    assert p["base"]["kl_to_sft"] > max(p["ppo"]["kl_to_sft"], p["dpo"]["kl_to_sft"]) > 0
    # PPO optimised the reward model: its score is above the SFT model's.
    assert p["ppo"]["rm_score"] > p["sft"]["rm_score"]
    # ... and wins most paired samples against it under the RM (SFT against itself: all ties, 0.5)
    assert p["ppo"]["win_rate_vs_sft"] > 0.6 and p["sft"]["win_rate_vs_sft"] == 0.5, p
    rm = table["stages"]["rm"]
    assert rm["eval_last"]["accuracy"] > 0.55 and rm["eval_last"]["loss"] < rm["eval_first"]["loss"] - 0.05, rm
    prefs = table["preferences"]
    assert prefs["pairs"] > 300 and prefs["gold_agreement"] > 0.7

    # The preference file is what the next stages read; every model loads with from_pretrained.
    pairs = load_table(DatasetSpec(prefs["path"], "preferences"))
    assert pairs.num_rows == prefs["pairs"] == pq.read_metadata(prefs["path"]).num_rows
    assert set(pq.read_schema(prefs["path"]).names) >= {"judge", "labeller", "flipped", "p_chosen"}
    assert set(pq.read_table(prefs["path"], columns=["labeller"]).column(0).to_pylist()) == {0, 1}
    for name in ("sft", "dpo", "ppo/policy"):
        assert load_causal_lm(out / name) is not None
    assert load_reward_model(out / "rm").score.out_features == 1
    printed = capsys.readouterr().out
    assert "gold (sampled)" in printed and "reward model: held-out accuracy" in printed
