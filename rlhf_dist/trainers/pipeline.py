"""The whole RLHF pipeline in one Ray session:

    base model --SFT on demonstrations--> SFT model --samples two answers per prompt, labellers pick--> preferences
    preferences --Bradley-Terry--> reward model;  SFT model --PPO against the reward model--> PPO policy
    SFT model --DPO on the same preferences--> DPO policy
    then base, SFT, PPO and DPO answer the same held-out prompts: gold reward, reward-model score, KL to SFT.

Every stage is the same driver its own command runs (`rlhf-dist sft | collect | rm | train | dpo`), handed a config
wired to the previous stages' outputs. Fields left null in the config take that wiring; a set one wins.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import ExitStack
from pathlib import Path

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.config.schema import PIPELINE_STAGES
from rlhf_dist.data.labels import label_folder
from rlhf_dist.metrics import json_safe
from rlhf_dist.models.tiny import ensure_tiny_model
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.orchestration.learner_groups import live_placement_groups, release_placement_groups
from rlhf_dist.trainers import collect, compare, dpo, offline, ppo, rm, sft


def _section(cfg: RunConfig, name: str, **fields) -> RunConfig:
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})


def artefacts(cfg: RunConfig) -> dict[str, str]:
    """Where each stage leaves what the next ones read."""
    return {
        "base": cfg.model.policy,
        "sft": str(offline.stage_output(cfg, "sft")),
        "collect": str(collect.output_path(cfg)),
        "rm": str(offline.stage_output(cfg, "rm")),
        "ppo": str(Path(cfg.output_dir) / "ppo" / "policy"),
        "dpo": str(offline.stage_output(cfg, "dpo")),
    }


def stage_configs(cfg: RunConfig, paths: dict[str, str]) -> dict[str, RunConfig]:
    """One config per stage: downstream of SFT the policy is the SFT model; the preference sets are `collect`'s."""
    after_sft = offline.with_model(cfg, policy=paths["sft"])
    c, r, d = cfg.collect, cfg.rm, cfg.dpo
    reward = cfg.pipeline.ppo_reward
    ppo_cfg = offline.with_model(
        after_sft, reference=cfg.model.reference or paths["sft"], reward=paths["rm"] if reward != "function" else None
    )
    ppo_cfg = _section(ppo_cfg, "reward", function=cfg.reward.function if reward != "reward_model" else None)
    ppo_cfg = _section(
        dataclasses.replace(ppo_cfg, output_dir=str(Path(paths["ppo"]).parent)), "checkpoint", save_final=True
    )
    return {
        "sft": cfg,
        "collect": _section(after_sft, "collect", policy=c.policy or paths["sft"]),
        "rm": _section(
            after_sft,
            "rm",
            init=r.init or paths["sft"],
            data=dataclasses.replace(r.data, path=r.data.path or paths["collect"]),
        ),
        "ppo": ppo_cfg,
        "dpo": _section(
            after_sft,
            "dpo",
            reference=d.reference or paths["sft"],
            data=dataclasses.replace(d.data, path=d.data.path or paths["collect"]),
        ),
    }


def stage_inputs(configs: dict[str, RunConfig]) -> dict[str, dict[str, str | None]]:
    """{stage: {config key: path}}: the models and data each stage reads."""
    c, r, p, d = configs["collect"], configs["rm"], configs["ppo"], configs["dpo"]
    sources = r.label.sources  # the preference sets rm and dpo read (rm.with_preference_sources)
    simulated = "simulated" in sources
    human = {"label.output": str(label_folder(r))} if "human" in sources else {}
    return {
        "collect": {"collect.policy": c.collect.policy},
        "rm": {"rm.init": r.rm.init, "rm.data.path": r.rm.data.path if simulated else None, **human},
        "ppo": {"model.policy": p.model.policy, "model.reward": p.model.reward},
        "dpo": {
            "model.policy": d.model.policy,
            "dpo.reference": d.dpo.reference,
            "dpo.data.path": d.dpo.data.path if simulated else None,
            **human,
        },
    }


def check_inputs(stages: list[str], configs: dict[str, RunConfig], paths: dict[str, str]) -> None:
    """Every input of a listed stage is made by an earlier listed stage or exists on disk, before anything starts."""
    made_by = {path: stage for stage, path in paths.items()}
    for i, stage in enumerate(stages):
        for key, path in stage_inputs(configs).get(stage, {}).items():
            producer = made_by.get(path)
            if path is None or producer in stages[:i] or Path(path).exists():
                continue
            fix = (
                f"add {producer} to pipeline.stages (before {stage})"
                if producer in PIPELINE_STAGES
                else f"fix {stage}'s {key}"
            )
            raise ConfigError("pipeline.stages", f"{stage} reads {key}={path!r}, which does not exist; {fix}")


def largest_stage_cpus(cfg: RunConfig) -> float:
    """CPUs of the hungriest stage: the stages hold their actors one after another in the one Ray session."""
    cpus = lambda *roles: sum(r.num_actors * r.num_cpus for r in roles)  # noqa: E731
    r = cfg.roles
    return max(
        r.reserved("num_cpus"),
        cpus(cfg.sft.learners),
        cpus(cfg.rm.learners),
        cpus(cfg.dpo.learners),
        cpus(r.rollout, cfg.collect.labellers),
        cpus(r.rollout, r.reference, r.reward),
    )


COMMANDS = {"sft": "sft", "collect": "collect", "rm": "rm", "ppo": "train", "dpo": "dpo"}  # the CLI's name of each


@run_dir.claimed("pipeline")
def run(cfg: RunConfig) -> dict:
    paths = artefacts(cfg)
    configs = stage_configs(cfg, paths)
    check_inputs(cfg.pipeline.stages, configs, paths)
    with ExitStack() as claims:
        # Every stage's run is claimed (PPO's in ppo/) before Ray starts: one that would clobber another run's
        # results fails now, not an hour in; each driver's own claim then finds its stage's.
        for stage in cfg.pipeline.stages:
            claims.enter_context(run_dir.claim(configs[stage], COMMANDS[stage]))
        return run_stages(cfg, paths, configs)


def run_stages(cfg: RunConfig, paths: dict[str, str], configs: dict[str, RunConfig]) -> dict:
    t0, stages = time.perf_counter(), cfg.pipeline.stages
    drivers = {"sft": sft, "collect": collect, "rm": rm, "ppo": ppo, "dpo": dpo}
    ensure_tiny_model(cfg)
    summaries: dict[str, dict] = {}
    with ray_session(cfg, min_cpus=largest_stage_cpus(cfg)):
        for stage in stages:
            print(f"=== pipeline: {stage} ===", flush=True)
            t, held = time.perf_counter(), live_placement_groups()
            summaries[stage] = drivers[stage].run(configs[stage])
            summaries[stage]["seconds"] = time.perf_counter() - t
            # Every driver releases its own actors; anything a stage still holds is freed for the next one.
            release_placement_groups(keep=held)
        print("=== pipeline: compare ===", flush=True)
        t = time.perf_counter()
        policies = {name: paths[name] for name in ("base", "sft", "ppo", "dpo") if Path(paths[name]).exists()}
        results = compare.compare(
            cfg, policies, sft=paths["sft"], reward_model=paths["rm"] if Path(paths["rm"]).exists() else None
        )
        summaries["compare"] = {"seconds": time.perf_counter() - t}
    rm_eval = summaries.get("rm", {}).get("eval_last", {})
    table = {
        "policies": results,
        "reward_model": {"path": paths["rm"], "heldout": rm_eval},
        "preferences": {k: v for k, v in summaries.get("collect", {}).items() if k != "stage"},
        "stages": summaries,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(cfg.output_dir) / cfg.pipeline.table_file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(table), indent=1) + "\n")
    table["table_path"] = str(out)
    print(report(table), flush=True)
    return table


def report(table: dict) -> str:
    lines = [compare.format_table(table["policies"])]
    acc = table["reward_model"]["heldout"].get("accuracy")
    if acc is not None:
        lines.append(f"reward model: held-out accuracy {acc:.3f} (against the labels)")
    prefs = table["preferences"]
    if "gold_agreement" in prefs:
        lines.append(f"preferences: {prefs['pairs']} pairs, labels agree with gold on {prefs['gold_agreement']:.3f}")
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in table["stages"].items())
    lines.append(f"wall time {table['wall_s']:.0f} s ({times}); table: {table.get('table_path', '')}")
    return "\n".join(lines)
