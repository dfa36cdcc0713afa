"""Placement from the config, checked per node before any actor starts; the dry-run table."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from rlhf_dist.config import load_config
from rlhf_dist.orchestration.placement import (
    ResourceError,
    assign,
    bundles_by_owner,
    format_placement,
    plan,
    required_resources,
    simulated_nodes,
)

REPO = Path(__file__).resolve().parents[1]


def _by_role(slots):
    out = {}
    for s in slots:
        out.setdefault(s.role, []).append(s)
    return out


@pytest.mark.parametrize(
    "path,nodes",
    [
        ("configs/qwen0.5b_1x8_vllm.yaml", 1),
        ("configs/qwen0.5b_2x8_multinode.yaml", 2),
        ("configs/qwen0.5b_4x8_multinode.yaml", 4),
    ],
)
def test_gpu_recipes_fit_their_layout_and_use_every_gpu_once(path, nodes):
    cfg = load_config(path)
    slots = assign(plan(cfg), simulated_nodes(nodes, 96, 8))
    owners = {(s.node, g) for s in slots for g in s.gpus}
    assert len(owners) == 8 * nodes  # every GPU of the layout is used
    roles = _by_role(slots)
    for role in roles:
        assert len(roles[role]) == getattr(cfg.roles, role).num_actors
    # a vLLM engine gets tensor_parallel_size GPUs, all on one node
    assert (
        all(len(s.gpus) == cfg.generation.tensor_parallel_size for s in roles["rollout"])
        or cfg.roles.rollout.colocate_with
    )


def test_two_node_recipe_spreads_engines_and_refuses_one_node():
    cfg = load_config("configs/qwen0.5b_2x8_multinode.yaml")
    slots = assign(plan(cfg), simulated_nodes(2, 96, 8))
    assert {s.node for s in _by_role(slots)["rollout"]} == {"node0", "node1"}
    with pytest.raises(ResourceError) as err:
        assign(plan(cfg), simulated_nodes(1, 96, 8))
    msg = str(err.value)
    assert "\n" not in msg and "node0: " in msg and "0/8 GPU free" in msg and "needs 2 CPU and 1 GPU" in msg


def test_colocated_roles_share_their_owners_gpu():
    cfg = load_config("configs/qwen0.5b_1x8_vllm.yaml")
    roles = _by_role(assign(plan(cfg), simulated_nodes(1, 96, 8)))
    for rank in range(8):
        gpus = {tuple(roles[r][rank].gpus) for r in ("policy", "rollout", "critic", "reference", "reward")}
        assert gpus == {(rank,)}
    table = format_placement(assign(plan(cfg), simulated_nodes(1, 96, 8)))
    assert table.splitlines()[0].split() == ["role", "actor", "node", "CPUs", "GPUs"]


def test_cli_plan_prints_a_table_and_fails_in_one_line(capsys):
    from rlhf_dist.cli import main

    assert main(["plan", "configs/qwen0.5b_2x8_multinode.yaml", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "node1" in out
    assert main(["plan", "configs/qwen0.5b_2x8_multinode.yaml", "--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-dist: error: roles:")


@pytest.mark.slow
def test_job_asking_for_more_than_the_cluster_has_fails_before_any_actor(tiny_cfg, local_ray):
    import ray

    from rlhf_dist.trainers.ppo import run

    cfg = tiny_cfg("roles.policy.num_gpus=1", "ray.num_cpus=null", "train.engine=deepspeed")
    with pytest.raises(ResourceError) as err:
        run(cfg)
    assert "GPU" in str(err.value) and "the cluster has" in str(err.value)
    # nothing was reserved: no placement group, no actor
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


def _requests_per_bundle(plans, owner):
    """Sum of the actors' GPU requests in each of ``owner``'s bundles (actor i sits in bundle i % n, as launch does)."""
    n = plans[owner].num_actors
    sums = [0.0] * n
    for p in plans.values():
        if p.bundle_owner == owner:
            for i in range(p.num_actors):
                sums[i % n] += p.num_gpus
    return sums


def test_actors_sharing_a_bundle_ask_exactly_its_gpus():
    colocated = [f"roles.{r}.colocate_with=policy" for r in ("rollout", "reward", "reference", "critic")]
    plans = plan(
        load_config(
            "configs/tiny_cpu.yaml",
            ["roles.policy.num_gpus=1", "roles.rollout.num_actors=2", "ray.num_cpus=6", *colocated],
        )
    )
    # 6 actors on the policy's one bundle: 1 policy + 2 rollout + reward + reference + critic
    assert required_resources(plans) == {"CPU": 6.0, "GPU": 1.0}
    assert bundles_by_owner(plans) == {"policy": (1, {"CPU": 6.0, "GPU": 1.0})}
    assert _requests_per_bundle(plans, "policy") == [pytest.approx(1.0)]
    # Ray counts in units of 1e-4 GPU: the requests must add up to the bundle there too, not to 1.0002
    units = sum(p.num_actors * round(p.num_gpus * 10_000) for p in plans.values())
    assert units == 10_000 and all(p.num_gpus > 0 for p in plans.values())
    # every actor is placed on the one GPU
    slots = assign(plans, simulated_nodes(1, 6, 1))
    assert len(slots) == 6 and {tuple(s.gpus) for s in slots} == {(0,)}


def test_uneven_sharing_fills_the_busiest_bundle_exactly():
    # policy 2 actors x 1 GPU; 3 rollout actors: bundle 0 holds policy 0, rollout 0 and 2; bundle 1 policy 1, rollout 1
    plans = plan(
        load_config(
            "configs/tiny_cpu.yaml",
            [
                "roles.policy.num_actors=2",
                "roles.policy.num_gpus=1",
                "roles.rollout.num_actors=3",
                "ray.num_cpus=8",
                "roles.rollout.colocate_with=policy",
            ],
        )
    )
    sums = _requests_per_bundle(plans, "policy")
    assert sums[0] == pytest.approx(1.0) and sums[1] <= 1.0
    assert bundles_by_owner(plans)["policy"] == (2, {"CPU": 3.0, "GPU": 1.0})  # the CPUs of the busiest bundle
    assert required_resources(plans)["GPU"] == 2.0


def test_a_colocation_chain_places_every_role_in_the_anchors_bundles():
    plans = plan(
        load_config(
            "configs/tiny_cpu.yaml",
            ["roles.policy.num_gpus=1", "roles.rollout.colocate_with=policy", "roles.critic.colocate_with=rollout"],
        )
    )
    assert plans["critic"].bundle_owner == "policy" and set(bundles_by_owner(plans)) == {
        "policy",
        "reward",
        "reference",
    }
    assert _requests_per_bundle(plans, "policy") == [pytest.approx(1.0)]


def _one_gpu_overrides() -> list[str]:
    """The ONE_GPU overrides as benchmarks/gpu_recipe.md writes them, so the test follows the document."""
    text = (REPO / "benchmarks" / "gpu_recipe.md").read_text()
    return shlex.split(re.search(r'ONE_GPU="([^"]*)"', text).group(1).replace("\\\n", " "))


@pytest.mark.parametrize(
    "extra", [[], ["roles.rollout.num_actors=4", "ray.num_cpus=8"]], ids=["recipe", "scaling_4_rollouts"]
)
def test_one_gpu_recipe_validates_and_plans_on_one_gpu(extra, capsys):
    from rlhf_dist.cli import main

    overrides = _one_gpu_overrides() + extra
    assert "roles.policy.num_gpus=1" in overrides and "generation.engine=vllm" in overrides
    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    plans = plan(cfg)
    assert required_resources(plans)["GPU"] == 1.0
    assert _requests_per_bundle(plans, "policy") == [pytest.approx(1.0)]
    slots = assign(plans, simulated_nodes(1, 16, 1))
    assert len(slots) == sum(getattr(cfg.roles, r).num_actors for r in plans)
    assert {tuple(s.gpus) for s in slots} == {(0,)}
    argv = ["plan", "configs/tiny_cpu.yaml", *overrides, "--nodes", "1", "--gpus-per-node", "1"]
    assert main([*argv, "--cpus-per-node", "16"]) == 0
    assert "rollout" in capsys.readouterr().out


@pytest.mark.parametrize("transport", ["object_store", "cuda_ipc", "nccl"])
def test_weight_sync_benchmark_gpu_configs_validate_and_plan(transport):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import weight_sync as bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    counts = [1, 2]
    cfg = load_config("configs/tiny_cpu.yaml", bench.config_overrides("models/x", transport, counts, 64, gpu=True))
    plans = {r: p for r, p in plan(cfg).items() if r in ("policy", "rollout")}  # what the benchmark launches
    gpus = 1 + max(counts) if transport == "nccl" else 1  # NCCL: the learner's GPU and one per rollout actor
    slots = assign(plans, simulated_nodes(1, 16, gpus))
    assert len({g for s in slots for g in s.gpus}) == gpus
