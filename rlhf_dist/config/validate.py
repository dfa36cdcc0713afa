"""Checks that run before anything starts: ranges (declared on the schema fields) and impossible combinations.

`validate` is pure and fast (no imports of user code, no filesystem); `check_paths` and `check_imports` look at the
machine and are called by the CLI right before a run, on the machine that holds the paths and the code.
"""

import dataclasses
import difflib
import importlib
import importlib.util
import os
import re
import socket
import urllib.parse
from typing import Any

from .coerce import config_to_dict, from_dict
from .errors import ConfigError
from .schema import CRITIC_FREE, GROUP_BASELINE, PIPELINE_STAGES, RunConfig

_FUNCTION_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _num(x: float) -> str:
    return f"{x:g}"


def _range_text(meta: dict) -> str:
    lo = f"[{_num(meta['ge'])}" if "ge" in meta else f"({_num(meta['gt'])}" if "gt" in meta else None
    hi = f"{_num(meta['le'])}]" if "le" in meta else f"{_num(meta['lt'])})" if "lt" in meta else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Ranges and non-empty strings, as declared by `option(...)` in the schema."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        meta = f.metadata
        if meta.get("nonempty") and not value:
            raise ConfigError(key, f"{value!r} is empty; give it a value (default {f.default!r})")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok = (
            ("gt" not in meta or value > meta["gt"])
            and ("ge" not in meta or value >= meta["ge"])
            and ("lt" not in meta or value < meta["lt"])
            and ("le" not in meta or value <= meta["le"])
        )
        if not ok:  # also catches NaN, which fails every comparison
            raise ConfigError(key, f"{value!r} is out of range; use a value {_range_text(meta)}")


def _check_model_and_reward(cfg: RunConfig) -> None:
    if not cfg.model.policy:
        raise ConfigError(
            "model.policy",
            "not set; set model.policy=PATH (a Hugging Face model dir), with "
            "model.build_tiny_if_missing=true to build the tiny model there",
        )
    fn = cfg.reward.function
    if fn is not None and not _FUNCTION_REF.fullmatch(fn):
        raise ConfigError(
            "reward.function", f"{fn!r} is not of the form module:function; write e.g. my_pkg.rewards:length_reward"
        )
    if fn is None and cfg.model.reward is None and cfg.reward.endpoint is None:
        raise ConfigError(
            "reward.function",
            "no reward source: none of reward.function, model.reward, reward.endpoint is set; "
            "set reward.function=module:function or model.reward=PATH, or reward.endpoint=http://HOST:PORT/PATH",
        )
    _check_endpoint(cfg.reward.endpoint)
    serve = cfg.reward.serve
    if serve.max_replicas is not None and serve.max_replicas < serve.replicas:
        raise ConfigError(
            "reward.serve.max_replicas",
            f"{serve.max_replicas} < reward.serve.replicas={serve.replicas}, the fewest Serve autoscales to; "
            "set it >= replicas, or null for a fixed count",
        )


def _check_endpoint(url: str | None) -> None:
    """An http(s) URL with a host: anything else would fail only at the first reward call, after every actor started."""
    if url is None:
        return
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "reward.endpoint",
            f"{url!r} is not an http(s) URL with a host; write e.g. http://127.0.0.1:8000/score",
        )


def _check_data(cfg: RunConfig) -> None:
    if cfg.data.task == "prompts" and not cfg.data.prompts:
        raise ConfigError(
            "data.prompts",
            "not set, but data.task=prompts reads prompts from it; "
            "set data.prompts=PATH (jsonl or parquet) or data.task=synthetic",
        )
    if cfg.data.task == "synthetic" and cfg.data.prompts:
        raise ConfigError(
            "data.prompts",
            f"{cfg.data.prompts!r} is ignored by data.task=synthetic; "
            f"set data.task=prompts to use it, or data.prompts=null",
        )


def _check_algo_roles(cfg: RunConfig) -> None:
    est, roles = cfg.algo.estimator, cfg.roles
    for name in ("rollout", "policy", "reward"):
        if roles.get(name).num_actors < 1:
            raise ConfigError(
                f"roles.{name}.num_actors",
                f"0, but every run needs a {name} actor; set roles.{name}.num_actors=1 or more",
            )
    if est in CRITIC_FREE and roles.critic.num_actors > 0:
        raise ConfigError(
            "roles.critic.num_actors",
            f"{roles.critic.num_actors}, but algo.estimator={est} uses no "
            f"critic; set roles.critic.num_actors=0 or algo.estimator=gae",
        )
    if est == "gae" and roles.critic.num_actors == 0:
        raise ConfigError(
            "roles.critic.num_actors",
            "0, but algo.estimator=gae needs a critic; set "
            "roles.critic.num_actors=1 or a critic-free algo.estimator "
            f"({', '.join(CRITIC_FREE)})",
        )
    spp = cfg.generation.samples_per_prompt
    if est in GROUP_BASELINE and spp < 2:
        raise ConfigError(
            "generation.samples_per_prompt",
            f"{spp}, but algo.estimator={est} compares samples of the "
            f"same prompt; set generation.samples_per_prompt=2 or more",
        )
    if roles.reference.num_actors == 0:  # even with algo.kl_coef=0 the KL to the reference is every row's metric
        raise ConfigError(
            "roles.reference.num_actors",
            f"0, but the KL penalty (algo.kl_coef={cfg.algo.kl_coef}) and the KL metric need reference log-probs; "
            f"set roles.reference.num_actors=1",
        )
    if cfg.model.reward is not None and roles.reward.num_actors == 0:
        raise ConfigError(
            "roles.reward.num_actors", "0, but model.reward needs actors to run on; set roles.reward.num_actors=1"
        )


def _check_off_policy(cfg: RunConfig) -> None:
    a = cfg.algo
    if a.off_policy == "tis" and a.tis_cap is None:
        raise ConfigError(
            "algo.tis_cap",
            "null, but algo.off_policy=tis truncates the weights at it; set algo.tis_cap=2 (or another cap)",
        )
    if a.off_policy != "icepop":
        return
    if a.tis_cap is not None:
        raise ConfigError(
            "algo.tis_cap",
            f"{a.tis_cap} is ignored by algo.off_policy=icepop (it masks, not truncates); set algo.tis_cap=null "
            "or algo.off_policy=tis",
        )
    if not (a.icepop_low < a.icepop_high and a.icepop_low <= 1.0 <= a.icepop_high):
        raise ConfigError(
            "algo.icepop_low",
            f"{a.icepop_low} with algo.icepop_high={a.icepop_high}: the band must hold ratio 1 (an on-policy token) "
            "and have low < high; e.g. algo.icepop_low=0.5 algo.icepop_high=5",
        )


def _check_batches(cfg: RunConfig) -> None:
    t, roles = cfg.train, cfg.roles
    learners = max(roles.policy.num_actors, roles.critic.num_actors)
    which = (
        "roles.policy.num_actors" if roles.policy.num_actors >= roles.critic.num_actors else "roles.critic.num_actors"
    )
    if t.prompts_per_iteration < learners:
        raise ConfigError(
            "train.prompts_per_iteration",
            f"{t.prompts_per_iteration} is fewer than the {learners} "
            f"learner actors ({which}); every learner needs a prompt: set "
            f"train.prompts_per_iteration={learners} or more",
        )
    samples = t.prompts_per_iteration * cfg.generation.samples_per_prompt
    if samples < t.mini_batches * learners:
        raise ConfigError(
            "train.mini_batches",
            f"{t.mini_batches} mini-batches x {learners} learners need "
            f"{t.mini_batches * learners} samples, an iteration has {samples}; "
            f"lower train.mini_batches or raise train.prompts_per_iteration",
        )
    if t.offload and t.engine != "deepspeed":
        raise ConfigError(
            "train.offload",
            f"true needs train.engine=deepspeed, got {t.engine}; set train.offload=false or train.engine=deepspeed",
        )


def _rollout_gpus(cfg: RunConfig) -> tuple[float, str]:
    """GPUs each rollout engine runs on, and the key that sets them (the anchor's for a colocated role left at 0)."""
    roles = cfg.roles
    shared = roles.rollout.colocate_with is not None and roles.rollout.num_gpus == 0
    return roles.gpus("rollout"), f"roles.{roles.anchor('rollout')}.num_gpus" if shared else "roles.rollout.num_gpus"


def _check_generation(cfg: RunConfig) -> None:
    g, (gpus, key) = cfg.generation, _rollout_gpus(cfg)
    tp = g.tensor_parallel_size
    if cfg.train.mode != "sync" and g.enable_sleep:
        raise ConfigError(
            "generation.enable_sleep",
            f"true with train.mode={cfg.train.mode}: the engines generate while the learners train, so they cannot "
            f"sleep then; set generation.enable_sleep=false or train.mode=sync",
        )
    if g.hybrid_engine and (cfg.train.mode != "sync" or g.engine != "hf"):
        what = f"train.mode={cfg.train.mode}" if cfg.train.mode != "sync" else f"generation.engine={g.engine}"
        raise ConfigError(
            "generation.hybrid_engine",
            f"true with {what}: a hybrid actor generates and trains by turns, so only train.mode=sync overlaps "
            f"nothing it cannot, and only the hf engine is tested inside a learner's process; set "
            f"generation.hybrid_engine=false, or train.mode=sync and generation.engine=hf",
        )
    if g.compile and g.engine != "hf":
        raise ConfigError(
            "generation.compile",
            f"true with generation.engine={g.engine}: it compiles the hf engine's forward; vLLM compiles its own "
            f"(generation.enforce_eager=false); set generation.compile=false",
        )
    if g.engine == "hf":
        if tp != 1:
            raise ConfigError(
                "generation.tensor_parallel_size",
                f"{tp} needs generation.engine=vllm (hf generate uses one device per actor); set it to 1",
            )
        return
    if gpus == 0:
        if not g.vllm_cpu:
            shared = "" if key == "roles.rollout.num_gpus" else f" (colocated, and {key}=0)"
            raise ConfigError(
                "roles.rollout.num_gpus",
                f"0{shared} with generation.engine=vllm; give the engines "
                f"GPUs ({key}=1) or set generation.vllm_cpu=true to run the "
                f"vllm-cpu build",
            )
        return  # vllm-cpu runs tensor-parallel workers as processes of its own ('mp' executor)
    if g.vllm_cpu:
        raise ConfigError(
            "generation.vllm_cpu", f"true, but {key}={_num(gpus)}; set generation.vllm_cpu=false or {key}=0"
        )
    if tp > gpus:
        raise ConfigError(
            "generation.tensor_parallel_size",
            f"{tp} is more than {key}={_num(gpus)}; set {key}={tp} or a smaller tensor_parallel_size",
        )
    if gpus % tp:
        raise ConfigError(
            "generation.tensor_parallel_size",
            f"{tp} does not divide {key}={_num(gpus)}; use a divisor of it, or change num_gpus",
        )


def _check_colocation(cfg: RunConfig) -> None:
    roles = cfg.roles
    names = roles.names()
    for name in names:
        target = roles.get(name).colocate_with
        key = f"roles.{name}.colocate_with"
        if target is None:
            continue
        if target == name:
            raise ConfigError(key, f"{target!r}: a role cannot colocate with itself; name another role or null")
        if target not in names:
            hint = difflib.get_close_matches(target, names, n=1)
            raise ConfigError(
                key,
                f"{target!r} is not a role"
                + (f"; did you mean {hint[0]}?" if hint else "")
                + f" (roles: {', '.join(names)})",
            )
        if roles.get(target).num_actors == 0:
            raise ConfigError(
                key,
                f"{target!r} has 0 actors, so there are no bundles to share; colocate with "
                f"another role or set it to null",
            )
    for name in names:  # every target is a known role now; follow each chain to find a cycle
        chain = [name]
        while (nxt := roles.get(chain[-1]).colocate_with) is not None:
            if nxt in chain:
                raise ConfigError(
                    f"roles.{name}.colocate_with",
                    f"colocation cycle {' -> '.join(chain + [nxt])}; "
                    f"point the roles at one role that keeps "
                    f"colocate_with=null",
                )
            chain.append(nxt)
    for name in names:
        # each actor sits in one of the anchor's bundles (launch: actor i -> bundle i % n) and shares its GPUs
        role, anchor = roles.get(name), roles.anchor(name)
        have = roles.get(anchor).num_gpus
        if role.colocate_with is not None and role.num_gpus > have:
            raise ConfigError(
                f"roles.{name}.num_gpus",
                f"{_num(role.num_gpus)} per actor, more than the "
                f"{_num(have)} of roles.{anchor}'s bundle it shares; set it "
                f"to {_num(have)} or less (0 = share the bundle's), or give "
                f"roles.{anchor} more",
            )


def _check_sync_and_ray(cfg: RunConfig) -> None:
    transport, roles = cfg.sync.transport, cfg.roles
    if transport in ("nccl", "cuda_ipc", "sparse_nccl"):
        for name in ("policy", "rollout"):
            if roles.gpus(name) == 0:
                raise ConfigError(
                    "sync.transport",
                    f"{transport} needs GPUs, but roles.{name}.num_gpus=0; set "
                    f"sync.transport=object_store (or auto) or give roles.{name} GPUs",
                )
    if transport in ("nccl", "sparse_nccl") and roles.anchor("policy") == roles.anchor("rollout"):
        # NCCL refuses two ranks on one GPU, and colocated roles share theirs
        raise ConfigError(
            "sync.transport",
            f"{transport}, but policy and rollout share GPUs (colocate_with); set sync.transport=cuda_ipc (or auto)",
        )
    if transport == "cuda_ipc" and roles.anchor("policy") != roles.anchor("rollout"):
        raise ConfigError(
            "sync.transport",
            "cuda_ipc needs policy and rollout on the same GPUs; set "
            "roles.rollout.colocate_with=policy or sync.transport=nccl",
        )
    if transport in ("nccl", "cuda_ipc", "sparse_nccl") and cfg.generation.engine != "vllm":
        raise ConfigError(
            "sync.transport",
            f"{transport} needs generation.engine=vllm (vLLM's weight-transfer "
            f"engines); hf generate takes weights through sync.transport=object_store",
        )
    if cfg.ray.num_cpus is not None:
        if cfg.ray.address is not None:
            raise ConfigError(
                "ray.num_cpus",
                f"{cfg.ray.num_cpus} sizes the embedded Ray only, but ray.address="
                f"{cfg.ray.address!r}; set ray.num_cpus=null",
            )
        need = roles.reserved("num_cpus")
        if need > cfg.ray.num_cpus:
            raise ConfigError(
                "ray.num_cpus",
                f"{cfg.ray.num_cpus}, but the roles reserve {_num(need)} CPUs; set "
                f"ray.num_cpus={int(-(-need // 1))} or lower roles.*.num_cpus",
            )


CHECKS = [
    _check_model_and_reward,
    _check_data,
    _check_algo_roles,
    _check_off_policy,
    _check_batches,
    _check_generation,
    _check_colocation,
    _check_sync_and_ray,
]


# --- SFT, reward model, DPO, preference collection, pipeline (issue 6) --------------------------------------------
_STAGE_COLUMNS = {
    "sft": ("prompt", "response"),
    "rm": ("prompt", "chosen", "rejected"),
    "dpo": ("prompt", "chosen", "rejected"),
}


def _check_offline_stages(cfg: RunConfig) -> None:
    for stage, names in _STAGE_COLUMNS.items():
        sc = getattr(cfg, stage)
        data = sc.data
        for canonical, source in data.columns.items():
            if canonical not in names:
                hint = difflib.get_close_matches(canonical, names, n=1)
                raise ConfigError(
                    f"{stage}.data.columns.{canonical}",
                    f"{stage} reads only the columns "
                    f"{', '.join(names)}"
                    + (f"; did you mean {hint[0]}?" if hint else "")
                    + "; key the mapping by those names",
                )
            if not source.strip():
                raise ConfigError(
                    f"{stage}.data.columns.{canonical}",
                    "is empty; give the column's name in the file, or leave the key out",
                )
        sources = [data.columns.get(n, n) for n in names]
        if len(set(sources)) != len(sources):
            raise ConfigError(
                f"{stage}.data.columns", f"{data.columns} maps two columns to one column of the file; give each its own"
            )
        if data.split is not None and data.path is None:
            raise ConfigError(
                f"{stage}.data.split",
                f"{data.split!r} needs {stage}.data.path (a DatasetDict folder); set the path or split=null",
            )
        _check_stage_actors(f"{stage}.learners", sc.learners)
        n = sc.learners.num_actors
        if sc.batch_size % n:
            raise ConfigError(
                f"{stage}.batch_size",
                f"{sc.batch_size} is not a multiple of {stage}.learners."
                f"num_actors={n}; every learner takes an equal shard, so use "
                f"{sc.batch_size - sc.batch_size % n or n} or "
                f"{sc.batch_size + n - sc.batch_size % n}",
            )
    d = cfg.dpo
    if d.loss_type == "ipo" and d.label_smoothing:
        raise ConfigError(
            "dpo.label_smoothing",
            f"{d.label_smoothing} is defined only for dpo.loss_type=sigmoid; set it to 0 or use loss_type=sigmoid",
        )


def _check_stage_actors(key: str, role) -> None:
    if role.num_actors < 1:
        raise ConfigError(f"{key}.num_actors", f"{role.num_actors}; the stage needs at least one actor, set 1")
    if role.colocate_with is not None:
        raise ConfigError(
            f"{key}.colocate_with",
            f"{role.colocate_with!r}: the stages run one after another, so "
            f"their actors never share GPUs with a PPO role; set it to null",
        )


def _check_collect(cfg: RunConfig) -> None:
    c = cfg.collect
    _check_stage_actors("collect.labellers", c.labellers)
    refs = {"collect.utility": c.utility}
    if c.judge == "function":
        if not c.judge_function:
            raise ConfigError(
                "collect.judge_function",
                "not set, but collect.judge=function scores pairs with it; set collect.judge_function=module:function",
            )
        refs["collect.judge_function"] = c.judge_function
    if c.judge == "reward_model" and not c.judge_model:
        raise ConfigError(
            "collect.judge_model",
            "not set, but collect.judge=reward_model scores pairs with it; "
            "set collect.judge_model=PATH (a reward model dir)",
        )
    for key, ref in refs.items():
        if not _FUNCTION_REF.fullmatch(ref):
            raise ConfigError(key, f"{ref!r} is not of the form module:function; write e.g. my_pkg.judges:score")


def _check_pipeline(cfg: RunConfig) -> None:
    stages = cfg.pipeline.stages
    dup = sorted({s for s in stages if stages.count(s) > 1})
    if dup:
        raise ConfigError("pipeline.stages", f"{', '.join(dup)} listed twice; name each stage once")
    ordered = [s for s in PIPELINE_STAGES if s in stages]
    if stages != ordered:
        raise ConfigError(
            "pipeline.stages",
            f"[{', '.join(stages)}] is out of order; the stages feed each other as [{', '.join(ordered)}]",
        )


def _check_stage_resources(cfg: RunConfig) -> None:
    """The stages run one at a time: each must fit the embedded Ray on its own."""
    if cfg.ray.num_cpus is None:
        return
    roles = cfg.roles
    needs = {
        "sft.learners": cfg.sft.learners.num_actors * cfg.sft.learners.num_cpus,
        "rm.learners": cfg.rm.learners.num_actors * cfg.rm.learners.num_cpus,
        "dpo.learners": cfg.dpo.learners.num_actors * cfg.dpo.learners.num_cpus,
        "collect.labellers + roles.rollout": cfg.collect.labellers.num_actors * cfg.collect.labellers.num_cpus
        + roles.rollout.num_actors * roles.rollout.num_cpus,
    }
    for what, need in needs.items():
        if need > cfg.ray.num_cpus:
            raise ConfigError(
                "ray.num_cpus",
                f"{cfg.ray.num_cpus}, but {what} reserve {_num(need)} CPUs; set "
                f"ray.num_cpus={int(-(-need // 1))} or lower their num_actors/num_cpus",
            )


CHECKS += [_check_offline_stages, _check_collect, _check_pipeline, _check_stage_resources]


# --- the labelling page and preference sources (issue 14) ----------------------------------------------------------


def _check_label(cfg: RunConfig) -> None:
    c = cfg.label
    dup = sorted({s for s in c.sources if c.sources.count(s) > 1})
    if dup:
        raise ConfigError("label.sources", f"{', '.join(dup)} listed twice; name each source once")
    if c.pairs_path is not None and c.pairs == "sample":
        raise ConfigError(
            "label.pairs_path", "is set, but label.pairs=sample samples its own; set label.pairs=collect or null it"
        )
    if any(ch.isspace() or ch in "/?#" for ch in c.host):
        raise ConfigError("label.host", f"{c.host!r} is not an address; write e.g. 127.0.0.1, 0.0.0.0 or ::1")


CHECKS += [_check_label]


# --- experiment trackers and chat templates (issue 13) -------------------------------------------------------------
# The module each tracker needs, and the package that brings it (all in the `trackers` extra).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _check_logging(cfg: RunConfig) -> None:
    t = cfg.logging.trackers
    dup = sorted({x for x in t if t.count(x) > 1})
    if dup:
        raise ConfigError("logging.trackers", f"{', '.join(dup)} listed twice; name each tracker once")
    if cfg.logging.mlflow_tracking_uri is not None and "mlflow" not in t:
        raise ConfigError(
            "logging.mlflow_tracking_uri",
            f"{cfg.logging.mlflow_tracking_uri!r} is set, but logging.trackers has no mlflow; add mlflow or null it",
        )


CHECKS += [_check_logging]


def check_trackers(cfg: RunConfig) -> None:
    """Every tracker in logging.trackers can be imported here (found, not imported: wandb alone takes seconds)."""
    for name in cfg.logging.trackers:
        module = TRACKER_MODULES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                "logging.trackers",
                f"{name} needs the {module!r} package, which is not installed; pip install 'rlhf_dist[trackers]' "
                f"or leave {name} out",
            )


def validate(cfg: RunConfig) -> RunConfig:
    """Type-check (also configs built in code), range-check and cross-check; returns the typed config."""
    typed = from_dict(RunConfig, config_to_dict(cfg))
    _check_fields(typed)
    for check in CHECKS:
        check(typed)
    return typed


def check_paths(cfg: RunConfig) -> None:
    """Model dirs and the prompts file exist on this machine, and reward.endpoint accepts a connection from it
    (skipped for `ray://`: they live on the cluster)."""
    if (cfg.ray.address or "").startswith("ray://"):
        return
    m = cfg.model
    dirs = {
        "model.reference": m.reference,
        "model.critic": m.critic,
        "model.reward": m.reward,
        "model.tokenizer": m.tokenizer,
    }
    if not m.build_tiny_if_missing:
        dirs["model.policy"] = m.policy
    for key, path in dirs.items():
        if path and not os.path.exists(path):
            fix = " or model.build_tiny_if_missing=true" if key == "model.policy" else ""
            raise ConfigError(
                key, f"{path!r} does not exist (relative paths are from the cwd {os.getcwd()}); fix the path{fix}"
            )
    if cfg.data.task == "prompts" and not os.path.exists(cfg.data.prompts):
        raise ConfigError("data.prompts", f"{cfg.data.prompts!r} does not exist (cwd {os.getcwd()}); fix the path")
    template = cfg.data.chat_template
    if template not in ("auto", "none") and not os.path.isfile(os.path.expanduser(template)):
        raise ConfigError(
            "data.chat_template",
            f"{template!r} is not auto, none or a file (cwd {os.getcwd()}); fix the path to a Jinja chat template",
        )
    check_endpoint_reachable(cfg.reward.endpoint)


def check_endpoint_reachable(url: str | None, timeout_s: float = 5.0) -> None:
    """reward.endpoint's host resolves and accepts a TCP connection from here: a typo in the host or port, or a
    service not started, is one line now rather than a failed first reward call after every actor started. Only a
    connection: nothing is POSTed (the service may count or bill calls)."""
    if url is None:
        return
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except socket.gaierror as err:
        problem = f"cannot resolve the host {parts.hostname!r} ({err.strerror})"
    except OSError as err:  # refused, unreachable, timed out
        problem = f"nothing accepts a connection at {parts.hostname}:{port} ({err.strerror or 'timed out'})"
    else:
        return
    raise ConfigError("reward.endpoint", f"{url}: {problem}; start the reward service first or fix the URL")


def resolve_function(key: str, ref: str):
    """``module:function`` -> the callable, or a ConfigError naming ``key`` and what is wrong with ``ref``."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is a config problem to report, not a crash
        raise ConfigError(
            key,
            f"cannot import {module_name!r} ({type(err).__name__}: {err}); check "
            f"the module name and that it is importable on every node",
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(attr, names, n=1)
        raise ConfigError(
            key,
            f"module {module_name!r} has no {attr!r}" + (f"; did you mean {module_name}:{hint[0]}?" if hint else ""),
        )
    if not callable(fn):
        raise ConfigError(
            key,
            f"{ref!r} is a {type(fn).__name__}, not a function; point it at a "
            f"callable(prompts, responses) -> list[float]",
        )
    return fn


def check_imports(cfg: RunConfig) -> None:
    """reward.function imports and is callable here (it may import heavy modules: hence not in validate); the
    trackers' packages are installed."""
    if cfg.reward.function is not None:
        resolve_function("reward.function", cfg.reward.function)
    check_trackers(cfg)
