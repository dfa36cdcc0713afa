"""The run config: shipped YAMLs, overrides, one-line errors naming the key, the CLI's error path."""

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from rlhf_dist.cli import main
from rlhf_dist.config import (
    DEFAULT_CONFIG,
    ConfigError,
    RunConfig,
    check_imports,
    check_paths,
    config_to_dict,
    dump_yaml,
    from_dict,
    load_config,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
GRPO = str(REPO / "configs" / "grpo_tiny_cpu.yaml")
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def load(*overrides, path=TINY):
    return load_config(path, list(overrides))


def error(*overrides, path=TINY) -> str:
    with pytest.raises(ConfigError) as info:
        load(*overrides, path=path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(dumped) == cfg


def test_all_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {
        "tiny_cpu.yaml",
        "grpo_tiny_cpu.yaml",
        "qwen0.5b_1x8_vllm.yaml",
        "qwen0.5b_2x8_multinode.yaml",
    }


def test_tiny_is_the_default_and_spells_out_every_key():
    assert Path(DEFAULT_CONFIG) == Path(TINY)
    cfg = load_config(None)
    assert cfg == load_config(TINY)
    assert cfg.algo.estimator == "gae" and cfg.roles.critic.num_actors == 1 and cfg.model.build_tiny_if_missing
    # the reference file lists every schema key, so a field added to the schema is added here too
    assert _keys(yaml.safe_load(Path(TINY).read_text())) == _keys(config_to_dict(RunConfig()))


def _keys(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_recipes_have_their_shape():
    grpo = load_config(GRPO)
    assert grpo.algo.estimator == "grpo" and grpo.roles.critic.num_actors == 0
    assert grpo.generation.samples_per_prompt >= 2
    one = load_config(REPO / "configs" / "qwen0.5b_1x8_vllm.yaml")
    assert one.generation.engine == "vllm" and one.roles.reserved("num_gpus") == 8
    assert one.sync.transport == "cuda_ipc" and one.roles.anchor("rollout") == "policy"
    two = load_config(REPO / "configs" / "qwen0.5b_2x8_multinode.yaml")
    assert two.roles.reserved("num_gpus") == 16 and two.train.zero_stage == 3 and two.ray.address == "auto"


@pytest.mark.parametrize(
    "overrides, skips",
    [
        ([], True),  # the GRPO recipe: one step per batch on on-policy samples
        (["train.recompute_old_logprobs=always"], False),
        (["train.ppo_epochs=2"], False),
        (["train.mini_batches=2"], False),
        # one step: the proximal policy of the correction is the learner's own, in every mode
        (["train.mode=one_step_off", "algo.off_policy=tis", "algo.tis_cap=2"], True),
        (["train.mode=async", "train.max_staleness=2", "algo.off_policy=icepop"], True),
        (["algo.tis_cap=2"], True),  # tis_cap alone means tis
        (["algo.kl_mode=reward"], True),  # sync: the KL penalty then reads the rollout engine's log-probs, same weights
        # pipelined with the KL in the reward: the engine's log-probs are of an older version, so they are recomputed
        (["train.mode=one_step_off", "algo.kl_mode=reward"], False),
        (["train.mode=async", "algo.kl_mode=reward"], False),
    ],
)
def test_old_logprobs_are_skipped_only_for_one_step_per_batch(overrides, skips):
    cfg = load(*overrides, path=GRPO)
    assert cfg.train.recompute_old_logprobs == (
        "always" if "train.recompute_old_logprobs=always" in overrides else "auto"
    )
    assert cfg.train.skips_old_logprobs(cfg.algo) is skips


def test_the_default_recomputes_old_logprobs():
    cfg = load_config(None)  # PPO: 2 epochs of 2 mini-batches, so auto keeps the pass
    assert cfg.train.recompute_old_logprobs == "auto" and not cfg.train.skips_old_logprobs(cfg.algo)
    assert cfg.sync.check_every == 10


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(path=TINY)
    assert cfg.model.policy == str(tmp_path / "tiny_model") and cfg.output_dir == str(tmp_path / "runs" / "tiny")
    assert load("model.policy=/abs/m").model.policy == "/abs/m"
    # through ray:// the paths live on the cluster: left as written
    assert load("ray.address=ray://head:10001", "ray.num_cpus=null").model.policy == "tiny_model"


# ---------------------------------------------------------------- overrides
def test_override_types():
    cfg = load(
        "train.iterations=3",
        "train.policy_lr=1e-5",
        "train.critic_lr=2",
        "reward.clip=null",
        "reward.clip=5",
        "train.offload=false",
        "logging.plot=false",
        "generation.top_p=0.9",
        "name=2024",
        "model.dtype=bfloat16",
        "algo.dual_clip=3",
    )
    assert cfg.train.iterations == 3
    assert cfg.train.policy_lr == 1e-5 and type(cfg.train.policy_lr) is float  # YAML 1.1 reads 1e-5 as a str
    assert cfg.train.critic_lr == 2.0 and type(cfg.train.critic_lr) is float  # int accepted for float
    assert cfg.reward.clip == 5.0 and cfg.logging.plot is False and cfg.generation.top_p == 0.9
    assert cfg.name == "2024"  # a str field keeps the text typed
    assert cfg.model.dtype == "bfloat16" and cfg.algo.dual_clip == 3.0
    assert load("reward.clip=null").reward.clip is None


def test_override_str_values_with_yaml_syntax_stay_text():
    assert load("reward.function=pkg.mod:fn").reward.function == "pkg.mod:fn"
    assert load("name=a: b").name == "a: b"


def test_override_a_whole_section_merges():
    cfg = load("roles.critic={num_actors: 2, num_cpus: 0.5}", "train.prompts_per_iteration=8")
    assert cfg.roles.critic.num_actors == 2 and cfg.roles.critic.num_cpus == 0.5
    assert cfg.roles.critic.placement == "pack"  # untouched keys keep their values


def test_list_and_dict_fields_in_a_future_section():
    @dataclasses.dataclass
    class Lora:
        targets: list[str] = dataclasses.field(default_factory=list)
        ranks: dict[str, int] = dataclasses.field(default_factory=dict)

    assert from_dict(Lora, {"targets": ["q", "v"], "ranks": {"q": 8}}) == Lora(["q", "v"], {"q": 8})
    with pytest.raises(ConfigError, match=r"^targets\[1\]: expected str, got 3 \(int\)$"):
        from_dict(Lora, {"targets": ["q", 3]})


def test_a_list_for_a_scalar_names_the_key():
    assert error("train.iterations=[a, b]") == "train.iterations: expected int, got ['a', 'b'] (list)"


def test_validate_checks_configs_built_in_code():
    cfg = load()
    cfg.train.zero_stage = 7
    with pytest.raises(ConfigError, match=r"^train\.zero_stage: 7 is out of range; use a value in \[0, 3\]$"):
        validate(cfg)
    cfg.train.zero_stage = "2"
    with pytest.raises(ConfigError, match=r"^train\.zero_stage: expected int, got '2' \(str\)$"):
        validate(cfg)


# ---------------------------------------------------------------- errors: unknown keys, types, choices
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iteratons=3", "train.iteratons: unknown key; did you mean train.iterations?"),
        ("trian.iterations=3", "trian: unknown key; did you mean train?"),
        ("train.temperature=0.7", "train.temperature: unknown key; did you mean generation.temperature?"),
        ("roles.critc.num_actors=1", "roles.critc: unknown key; did you mean roles.critic?"),
        (
            "train.iterations.x=1",
            "train.iterations: is a value (int), not a section; override it as train.iterations=VALUE",
        ),
        ("train.iterations", "override 'train.iterations': expected KEY=VALUE, e.g. train.iterations=10"),
    ],
)
def test_unknown_keys_and_bad_override_syntax(override, message):
    assert error(override) == message


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {policy: m, build_tiny_if_missing: true}\nreward: {function: a:b}\nroles: {critic: {num_actor: 1}}\n"
    )
    assert error(path=bad) == "roles.critic.num_actor: unknown key; did you mean roles.critic.num_actors?"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iterations=ten", "train.iterations: expected int, got 'ten' (str)"),
        ("train.iterations=true", "train.iterations: expected int, got True (bool)"),
        ("train.iterations=2.5", "train.iterations: expected int, got 2.5 (float)"),
        ("train.policy_lr=fast", "train.policy_lr: expected float, got 'fast' (str)"),
        ("train.offload=1", "train.offload: expected bool (true/false), got 1 (int)"),
        ("reward.clip=big", "reward.clip: expected float or null, got 'big' (str)"),
        ("name=", "name: expected str, got null"),
        ("train=5", "train: expected a mapping (a section), got 5 (int); write it as `train: {...}`"),
        ("model.dtype=bf16", "model.dtype: 'bf16' is not one of float32, bfloat16, float16; did you mean bfloat16?"),
        ("algo.estimator=ppo", "algo.estimator: 'ppo' is not one of gae, grpo, rloo, reinforce_pp"),
    ],
)
def test_type_and_choice_errors(override, message):
    assert error(override) == message


# ---------------------------------------------------------------- errors: ranges
@pytest.mark.parametrize(
    "override, key, rng",
    [
        ("train.policy_lr=0", "train.policy_lr", "> 0"),
        ("train.zero_stage=4", "train.zero_stage", "in [0, 3]"),
        ("algo.clip_eps=0", "algo.clip_eps", "> 0"),
        ("algo.dual_clip=1", "algo.dual_clip", "> 1"),
        ("algo.gamma=1.5", "algo.gamma", "in [0, 1]"),
        ("algo.lam=-0.1", "algo.lam", "in [0, 1]"),
        ("roles.reward.num_actors=-1", "roles.reward.num_actors", ">= 0"),
        ("roles.policy.num_gpus=-1", "roles.policy.num_gpus", ">= 0"),
        ("generation.temperature=0", "generation.temperature", "> 0"),
        ("generation.top_p=1.5", "generation.top_p", "in (0, 1]"),
        ("generation.top_p=.nan", "generation.top_p", "in (0, 1]"),
        ("train.iterations=0", "train.iterations", ">= 1"),
        ("sync.check_every=0", "sync.check_every", ">= 1"),
    ],
)
def test_range_errors(override, key, rng):
    value = override.split("=")[1]
    msg = error(override)
    assert msg.startswith(f"{key}: ") and msg.endswith(f"is out of range; use a value {rng}"), msg
    assert value.lstrip(".").lower() in msg.lower()


def test_empty_required_strings():
    assert error("output_dir=''") == "output_dir: '' is empty; give it a value (default 'runs/tiny')"


# ---------------------------------------------------------------- errors: impossible combinations
@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (
            ["algo.estimator=grpo", "generation.samples_per_prompt=4"],
            "roles.critic.num_actors",
            "set roles.critic.num_actors=0 or algo.estimator=gae",
        ),
        (["roles.critic.num_actors=0"], "roles.critic.num_actors", "set roles.critic.num_actors=1"),
        (
            ["algo.estimator=rloo", "roles.critic.num_actors=0"],
            "generation.samples_per_prompt",
            "set generation.samples_per_prompt=2 or more",
        ),
        (
            ["algo.estimator=reinforce_pp", "roles.critic.num_actors=0", "roles.policy.num_actors=0"],
            "roles.policy.num_actors",
            "set roles.policy.num_actors=1",
        ),
        (["roles.reference.num_actors=0"], "roles.reference.num_actors", "set roles.reference.num_actors=1"),
        (["roles.reference.num_actors=0", "algo.kl_coef=0"], "roles.reference.num_actors", "KL metric"),
        (
            ["roles.policy.num_actors=2", "roles.critic.num_actors=4", "train.prompts_per_iteration=3"],
            "train.prompts_per_iteration",
            "(roles.critic.num_actors)",
        ),
        (["train.mini_batches=128"], "train.mini_batches", "lower train.mini_batches"),
        (["train.offload=true", "train.engine=torch"], "train.offload", "train.engine=deepspeed"),
        (["generation.engine=vllm"], "roles.rollout.num_gpus", "generation.vllm_cpu=true"),
        (
            ["roles.policy.num_gpus=1", "roles.rollout.num_gpus=1", "sync.transport=nccl"],
            "sync.transport",
            "needs generation.engine=vllm",
        ),
        (
            ["generation.engine=vllm", "roles.rollout.num_gpus=1", "generation.tensor_parallel_size=2"],
            "generation.tensor_parallel_size",
            "is more than roles.rollout.num_gpus=1",
        ),
        (
            ["generation.engine=vllm", "roles.rollout.num_gpus=4", "generation.tensor_parallel_size=3"],
            "generation.tensor_parallel_size",
            "does not divide roles.rollout.num_gpus=4",
        ),
        (["generation.tensor_parallel_size=2"], "generation.tensor_parallel_size", "needs generation.engine=vllm"),
        (
            ["generation.engine=vllm", "generation.vllm_cpu=true", "generation.compile=true"],
            "generation.compile",
            "set generation.compile=false",
        ),
        (["roles.critic.colocate_with=polcy"], "roles.critic.colocate_with", "did you mean policy?"),
        (["roles.critic.colocate_with=critic"], "roles.critic.colocate_with", "cannot colocate with itself"),
        (
            ["roles.critic.colocate_with=policy", "roles.policy.colocate_with=critic"],
            "roles.policy.colocate_with",
            "colocation cycle policy -> critic -> policy",
        ),
        (
            ["roles.policy.num_gpus=1", "roles.critic.colocate_with=policy", "roles.critic.num_gpus=2"],
            "roles.critic.num_gpus",
            "more than the 1 of roles.policy",
        ),
        (
            ["generation.engine=vllm", "roles.rollout.colocate_with=policy"],
            "roles.rollout.num_gpus",
            "(colocated, and roles.policy.num_gpus=0) with generation.engine=vllm; give the engines GPUs "
            "(roles.policy.num_gpus=1)",
        ),
        (
            [
                "generation.engine=vllm",
                "roles.rollout.colocate_with=policy",
                "roles.policy.num_gpus=1",
                "generation.tensor_parallel_size=2",
            ],
            "generation.tensor_parallel_size",
            "is more than roles.policy.num_gpus=1",
        ),
        (
            ["sync.transport=nccl", "roles.policy.num_gpus=1", "roles.rollout.colocate_with=policy"],
            "sync.transport",
            "set sync.transport=cuda_ipc",
        ),
        (
            ["roles.rollout.num_actors=3", "roles.rollout.colocate_with=policy"],
            "ray.num_cpus",
            "the roles reserve 7 CPUs",
        ),
        (
            ["sync.transport=cuda_ipc", "roles.policy.num_gpus=1", "roles.rollout.num_gpus=1"],
            "sync.transport",
            "set roles.rollout.colocate_with=policy or sync.transport=nccl",
        ),
        (["sync.transport=nccl"], "sync.transport", "needs GPUs, but roles.policy.num_gpus=0"),
        (["sync.transport=cuda_ipc", "roles.policy.num_gpus=1"], "sync.transport", "roles.rollout.num_gpus=0"),
        (["model.policy=''"], "model.policy", "model.build_tiny_if_missing=true"),
        (["reward.function=not_a_ref"], "reward.function", "is not of the form module:function"),
        (["reward.function=null"], "reward.function", "set reward.function=module:function or model.reward=PATH"),
        (["data.task=prompts"], "data.prompts", "set data.prompts=PATH"),
        (["data.prompts=p.jsonl"], "data.prompts", "set data.task=prompts"),
        (["ray.num_cpus=3"], "ray.num_cpus", "the roles reserve 5 CPUs; set ray.num_cpus=5"),
        (["ray.address=auto"], "ray.num_cpus", "sizes the embedded Ray only"),
    ],
)
def test_impossible_combinations(overrides, key, fix):
    msg = error(*overrides)
    assert msg.startswith(key + ": ") and fix in msg, msg


def test_colocation_and_gpus_that_fit():
    cfg = load(
        "generation.engine=vllm",
        "roles.rollout.num_gpus=4",
        "generation.tensor_parallel_size=2",
        "roles.policy.num_gpus=4",
        "sync.transport=cuda_ipc",
        "roles.rollout.colocate_with=policy",
        "roles.critic.colocate_with=rollout",
    )
    assert cfg.roles.anchor("critic") == "policy" and cfg.roles.reserved("num_gpus") == 4


def test_vllm_cpu_takes_tensor_parallel_workers():
    cfg = load_config(
        "configs/tiny_cpu.yaml",
        ["generation.engine=vllm", "generation.vllm_cpu=true", "generation.tensor_parallel_size=2"],
    )
    assert cfg.generation.tensor_parallel_size == 2 and cfg.weight_transport() == "object_store"


def test_a_colocated_role_left_at_0_gpus_shares_its_anchors():
    # the one-GPU recipe (benchmarks/gpu_recipe.md): only the policy names a GPU, every other role shares it
    cfg = load(
        "roles.policy.num_gpus=1",
        "generation.engine=vllm",
        "sync.transport=cuda_ipc",
        *(f"roles.{r}.colocate_with=policy" for r in ("rollout", "reward", "reference", "critic")),
    )
    assert cfg.roles.rollout.num_gpus == 0 and cfg.roles.gpus("rollout") == 1 and cfg.roles.gpus("reward") == 1
    assert cfg.roles.reserved("num_gpus") == 1 and cfg.roles.reserved("num_cpus") == 5  # every actor brings CPUs
    # more rollout actors than the anchor has GPUs is fine: they share (the 1x8 recipe's scaling to 16 engines)
    assert (
        load(
            "roles.policy.num_gpus=1",
            "roles.rollout.colocate_with=policy",
            "roles.rollout.num_gpus=1",
            "roles.rollout.num_actors=2",
            "ray.num_cpus=6",
        ).roles.gpus("rollout")
        == 1
    )
    assert load().roles.gpus("rollout") == 0  # a role with its own bundles: its own num_gpus


# ---------------------------------------------------------------- machine checks
def test_check_imports(monkeypatch):
    fake = types.ModuleType("fake_rewards")
    fake.length_reward = lambda prompts, responses: [float(len(r)) for r in responses]
    fake.not_callable = 3
    monkeypatch.setitem(sys.modules, "fake_rewards", fake)
    check_imports(load("reward.function=fake_rewards:length_reward"))
    for ref, text in [
        ("no_such_mod_xyz:f", "cannot import 'no_such_mod_xyz'"),
        ("fake_rewards:length_rewad", "did you mean fake_rewards:length_reward?"),
        ("fake_rewards:not_callable", "not a function"),
    ]:
        with pytest.raises(ConfigError, match=r"^reward\.function: ") as info:
            check_imports(load(f"reward.function={ref}"))
        assert text in str(info.value)


def test_check_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_paths(load())  # the tiny policy is built when missing
    with pytest.raises(ConfigError, match=r"^model\.policy: .*missing_model' does not exist"):
        check_paths(load("model.policy=missing_model", "model.build_tiny_if_missing=false"))
    with pytest.raises(ConfigError, match=r"^data\.prompts: "):
        check_paths(load("data.task=prompts", "data.prompts=nope.jsonl"))


# ---------------------------------------------------------------- files
def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_config(tmp_path / "nope.yaml")
    assert isinstance(info.value, ConfigError) and "not found" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iterations: [1\n")
    assert "invalid YAML at line" in error(path=bad)
    bad.write_text("- a\n- b\n")
    assert "top level must be a mapping" in error(path=bad)
    bad.write_text("train:\n  iterations: 1\n  iterations: 2\n")
    assert error(path=bad).endswith("line 3: key 'iterations' is given twice; keep one")


# ---------------------------------------------------------------- CLI
def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", TINY, "train.iterations=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["iterations"] == 3 and printed["algo"]["estimator"] == "gae"


@pytest.mark.parametrize(
    "argv, text",
    [
        (["config", TINY, "train.iteratons=3"], "train.iteratons: unknown key; did you mean train.iterations?"),
        (["train", TINY, "algo.estimator=grpo"], "roles.critic.num_actors:"),
        (["train", "no/such.yaml"], "config file 'no/such.yaml' not found"),
    ],
)
def test_cli_errors_are_one_line(argv, text, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-dist: error: ") and text in lines[0]
    assert captured.out == ""


def test_cli_train_dispatches_to_the_driver(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setitem(sys.modules, "rlhf_dist.trainers.ppo", types.SimpleNamespace(run=seen.append))
    monkeypatch.setitem(sys.modules, "fake_rewards", types.SimpleNamespace(r=lambda p, r: [0.0] * len(r)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_DIST_DRIVER", "1")  # the driver itself, as the supervisor starts it (supervise.py)
    assert main(["train", TINY, "train.iterations=2", "reward.function=fake_rewards:r"]) == 0
    assert len(seen) == 1 and seen[0].train.iterations == 2


def test_cli_init_tiny(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setitem(
        sys.modules, "rlhf_dist.models.tiny", types.SimpleNamespace(build_tiny=lambda d, seed: calls.append((d, seed)))
    )
    assert main(["init-tiny", str(tmp_path / "m"), "--seed", "7"]) == 0
    assert calls == [(str(tmp_path / "m"), 7)]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["init-tiny", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["init-tiny", str(tmp_path / "m"), "--overwrite"]) == 0


def test_cli_usage_error_returns_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_cli_module_entry_point_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.cli", "config", TINY, "train.iteratons=3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == ("rlhf-dist: error: train.iteratons: unknown key; did you mean train.iterations?\n")


def test_a_local_run_from_the_cli_binds_loopback(tmp_path):
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, on first import; the CLI sets it before the driver imports
    Ray, so an embedded run opens no port on the machine's network address."""
    code = (
        "import argparse, sys; sys.path.insert(0, 'tests'); from rlhf_dist.cli import run_job; "
        f"run_job('ray_probe:node_ip')(argparse.Namespace(config='configs/tiny_cpu.yaml', overrides="
        f"['model.policy={tmp_path / 'tiny'}', 'ray.num_cpus=5']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RAY_NODE_IP 127.0.0.1" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_every_role_in_the_table_is_built_the_same_way():
    """One row per RolesConfig section, each naming a class built as Role(cfg, rank, world_size)."""
    import inspect

    from rlhf_dist.config import ROLE_TABLE, RolesConfig, resolve_function

    assert [r.name for r in ROLE_TABLE] == RolesConfig().names()
    for spec in ROLE_TABLE:
        params = list(inspect.signature(resolve_function("ROLE_TABLE", spec.worker)).parameters)
        assert params[:3] == ["cfg", "rank", "world_size"], (spec.name, params)
    assert [r.name for r in ROLE_TABLE if r.learner] == ["policy", "critic"]
