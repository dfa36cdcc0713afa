"""Placement from the config, checked per node before any actor starts; the dry-run table."""
import pytest

from rlhf_dist.config import load_config
from rlhf_dist.distributed.placement import ResourceError, assign, format_placement, plan, simulated_nodes


def _by_role(slots):
    out = {}
    for s in slots:
        out.setdefault(s.role, []).append(s)
    return out


@pytest.mark.parametrize("path,nodes", [("configs/qwen0.5b_1x8_vllm.yaml", 1), ("configs/qwen0.5b_2x8_multinode.yaml", 2),
                                        ("configs/qwen0.5b_4x8_multinode.yaml", 4)])
def test_gpu_recipes_fit_their_layout_and_use_every_gpu_once(path, nodes):
    cfg = load_config(path)
    slots = assign(plan(cfg), simulated_nodes(nodes, 96, 8))
    owners = {(s.node, g) for s in slots for g in s.gpus}
    assert len(owners) == 8 * nodes  # every GPU of the layout is used
    roles = _by_role(slots)
    for role in roles:
        assert len(roles[role]) == getattr(cfg.roles, role).num_actors
    # a vLLM engine gets tensor_parallel_size GPUs, all on one node
    assert all(len(s.gpus) == cfg.generation.tensor_parallel_size for s in roles["rollout"]) or \
        cfg.roles.rollout.colocate_with


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
