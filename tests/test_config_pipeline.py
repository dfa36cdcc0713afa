"""The sft / rm / dpo / collect / pipeline config sections: the shipped recipe, and one-line errors naming the key."""

from pathlib import Path

import pytest

from rlhf_dist.config import ConfigError, dump_yaml, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
PIPELINE = str(REPO / "configs" / "pipeline_tiny_cpu.yaml")


def error(*overrides, path=PIPELINE) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_pipeline_recipe_loads_and_round_trips(tmp_path):
    cfg = load_config(PIPELINE)
    assert cfg.pipeline.stages == ["sft", "collect", "rm", "ppo", "dpo"]
    assert cfg.pipeline.ppo_reward == "reward_model" and cfg.collect.judge == "simulated"
    dumped = tmp_path / "resolved.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(dumped) == cfg


def test_sections_have_defaults_in_every_config():
    cfg = load_config(TINY)
    assert cfg.sft.data.path is None and cfg.sft.learners.num_actors == 1
    assert (cfg.dpo.beta, cfg.dpo.loss_type) == (0.1, "sigmoid")
    assert cfg.rm.init is None and cfg.collect.output is None


def test_data_columns_and_overrides():
    cfg = load_config(
        TINY,
        [
            "sft.data.columns={prompt: question, response: answer}",
            "rm.data.max_tokens=128",
            "dpo.data.on_overlong=error",
        ],
    )
    assert cfg.sft.data.columns == {"prompt": "question", "response": "answer"}
    assert cfg.rm.data.max_tokens == 128 and cfg.dpo.data.on_overlong == "error"


def test_relative_paths_are_made_absolute():
    cfg = load_config(TINY, ["sft.data.path=data/demos.jsonl", "collect.output=prefs.parquet"])
    assert Path(cfg.sft.data.path).is_absolute() and Path(cfg.collect.output).is_absolute()


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (
            ["sft.data.columns={prompt: q, chosen: c}"],
            "sft.data.columns.chosen",
            "reads only the columns prompt, response",
        ),
        (["rm.data.columns={promt: q}"], "rm.data.columns.promt", "did you mean prompt"),
        (["dpo.data.columns={chosen: text, rejected: text}"], "dpo.data.columns", "two columns to one column"),
        (["rm.data.columns={chosen: ' '}"], "rm.data.columns.chosen", "is empty"),
        (["sft.data.split=train"], "sft.data.split", "needs sft.data.path"),
        (
            ["sft.learners.num_actors=3"],
            "sft.batch_size",
            "not a multiple of sft.learners.num_actors=3; every learner takes an equal shard, so use 30 or 33",
        ),
        (["rm.learners.num_actors=0"], "rm.learners.num_actors", "at least one actor"),
        (["dpo.learners.colocate_with=policy"], "dpo.learners.colocate_with", "one after another"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "only for dpo.loss_type=sigmoid"),
        (["dpo.label_smoothing=0.5"], "dpo.label_smoothing", "out of range; use a value in [0, 0.5)"),
        (["dpo.loss_type=hinge"], "dpo.loss_type", "is not one of sigmoid, ipo"),
        (["dpo.beta=0"], "dpo.beta", "out of range; use a value > 0"),
        (["sft.eval_fraction=1"], "sft.eval_fraction", "in [0, 1)"),
        (["collect.flip_rate=0.7"], "collect.flip_rate", "in [0, 0.5]"),
        (["collect.noise_temperature=-1"], "collect.noise_temperature", ">= 0"),
        (["collect.judge=reward_model"], "collect.judge_model", "set collect.judge_model=PATH"),
        (["collect.judge=function", "collect.judge_function=null"], "collect.judge_function", "not set"),
        (
            ["collect.judge=function", "collect.judge_function=my_judge"],
            "collect.judge_function",
            "not of the form module:function",
        ),
        (["collect.utility=gold"], "collect.utility", "not of the form module:function"),
        (["collect.judge=llm"], "collect.judge", "not one of simulated, function, reward_model"),
        (["collect.labellers.num_actors=0"], "collect.labellers.num_actors", "at least one actor"),
        (["pipeline.stages=[rm, sft]"], "pipeline.stages", "out of order; the stages feed each other as [sft, rm]"),
        (["pipeline.stages=[sft, sft]"], "pipeline.stages", "sft listed twice"),
        (["pipeline.stages=[sft, grpo]"], "pipeline.stages[1]", "is not one of sft, collect, rm, ppo, dpo"),
        (["pipeline.stages=[]"], "pipeline.stages", "is empty"),
        (["pipeline.ppo_reward=gold"], "pipeline.ppo_reward", "not one of reward_model, function, both"),
        (
            ["sft.learners.num_actors=6", "sft.batch_size=36"],
            "ray.num_cpus",
            "5, but sft.learners reserve 6 CPUs; set ray.num_cpus=6",
        ),
        (["collect.labellers.num_actors=5"], "ray.num_cpus", "collect.labellers + roles.rollout reserve 6 CPUs"),
        (["sft.epcohs=3"], "sft.epcohs", "did you mean sft.epochs"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, key, words):
    msg = error(*overrides)
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg


def test_collect_ray_check_sees_the_rollout_actors():
    # 4 labellers + 1 rollout actor = 5 CPUs: exactly what the recipe's embedded Ray has
    assert load_config(PIPELINE, ["collect.labellers.num_actors=4", "ray.num_cpus=5"]).collect.labellers.num_actors == 4


def test_missing_preferences_are_a_config_error_before_any_actor(tmp_path):
    from rlhf_dist.trainers.rm import preferences_path

    cfg = load_config(PIPELINE, [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^rm\.data\.path: .*preferences\.parquet' does not exist; .*collect"):
        preferences_path(cfg, "rm")


def test_pipeline_names_a_missing_input_of_a_left_out_stage(tmp_path):
    from rlhf_dist.trainers.pipeline import artefacts, check_inputs, stage_configs

    def check(*overrides):
        cfg = load_config(PIPELINE, [f"output_dir={tmp_path}", "pipeline.stages=[rm, dpo]", *overrides])
        paths = artefacts(cfg)
        check_inputs(cfg.pipeline.stages, stage_configs(cfg, paths), paths)

    with pytest.raises(
        ConfigError,
        match=r"^pipeline\.stages: rm reads rm\.init='.*/sft', which does not exist; "
        r"add sft to pipeline\.stages \(before rm\)$",
    ):
        check()
    (tmp_path / "sft").mkdir()
    with pytest.raises(ConfigError, match=r"rm reads rm\.data\.path='.*preferences\.parquet', .* add collect"):
        check()
    with pytest.raises(ConfigError, match=r"rm reads rm\.data\.path='/nowhere/p\.jsonl', .*; fix rm's rm\.data\.path"):
        check("rm.data.path=/nowhere/p.jsonl")
    (tmp_path / "preferences.parquet").write_bytes(b"")
    check()
    check("pipeline.stages=[sft, collect, rm, ppo, dpo]", f"output_dir={tmp_path / 'fresh'}")  # all made in turn


@pytest.mark.parametrize(
    "command, rows, words",
    [
        (
            "sft",
            [{"prompt": "the cat sat", "response": "happy"}, {"prompt": "a dog ran", "response": "  "}],
            "sft.data.path: {file}: row 1, column 'response': empty text",
        ),
        (
            "rm",
            [
                {"prompt": "the cat", "chosen": "good", "rejected": "bad"},
                {"prompt": "a dog", "chosen": "kind", "rejected": " kind"},
            ],
            "rm.data.path: {file}: row 1, column 'rejected': same text as column 'chosen'",
        ),
        (
            "dpo",
            [{"prompt": "the cat", "good": "warm", "rejected": "cold"}],
            "dpo.data.path: {file}: row 0, column 'chosen': no such column",
        ),
    ],
)
def test_bad_rows_stop_the_command_before_any_actor_starts(command, rows, words, tiny_model, tmp_path, capsys):
    import json

    import ray

    from rlhf_dist.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            command,
            PIPELINE,
            f"model.policy={tiny_model}",
            f"output_dir={tmp_path / 'run'}",
            f"{command}.data.path={data}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert words.format(file=data) in err, err
    assert not ray.is_initialized()
