"""The PPO driver (and the critic-free family): it holds the algorithm; the actors hold the models."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from rlhf_dist.algo import AdaptiveKLController, FixedKLController
from rlhf_dist.checkpoint import checkpoint_root, latest_checkpoint, load_driver_state, prune, save_driver_state
from rlhf_dist.config import check_imports
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import to_padded
from rlhf_dist.data.prompts import PromptSampler, read_prompt_texts, tokenize_prompts
from rlhf_dist.metrics import MetricsLog, console_line, plot
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.models.tiny import build_tiny
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.orchestration.launch import running_roles
from rlhf_dist.orchestration.placement import plan, required_resources
from rlhf_dist.orchestration.role_group import collect_compute_stats
from rlhf_dist.orchestration.weight_push import WeightPush
from rlhf_dist.trainers import timing
from rlhf_dist.trainers.experience import compute_advantages

CONSOLE_KEYS = ("reward_mean", "gold_reward_mean", "kl", "policy/clip_frac", "critic/value_loss", "response_len", "time/iteration")
PLOT_KEYS = ("reward_mean", "gold_reward_mean", "kl")
LEARNER_ROLES = ("policy", "critic")


def merge_columns(batch: pa.RecordBatch, *parts: pa.RecordBatch) -> pa.RecordBatch:
    for part in parts:
        for name in part.schema.names:
            batch = batch.append_column(part.schema.field(name), part.column(name))
    return batch


def prepare(cfg):
    """Everything that can fail without a cluster fails here, before any actor starts."""
    if cfg.model.build_tiny_if_missing and not (Path(cfg.model.policy) / "config.json").exists():
        build_tiny(cfg.model.policy, seed=cfg.seed)
    check_imports(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    table = tokenize_prompts(read_prompt_texts(cfg), tokenizer, cfg.data.max_prompt_tokens)
    return PromptSampler(table, cfg.train.prompts_per_iteration, cfg.generation.samples_per_prompt, cfg.seed)


def run(cfg) -> dict:
    """Runs ``cfg.train.iterations`` iterations; returns a summary (paths, first/last metrics)."""
    sampler = prepare(cfg)
    out = Path(cfg.output_dir)
    log = MetricsLog(out / cfg.logging.metrics_file, resume=cfg.checkpoint.resume)
    a = cfg.algo
    kl_ctl = AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target else FixedKLController(a.kl_coef)
    with ray_session(cfg, min_cpus=required_resources(plan(cfg))["CPU"]):
        t0 = time.perf_counter()
        with running_roles(cfg) as groups:
            startup_s = time.perf_counter() - t0
            final = train(cfg, groups, sampler, kl_ctl, log)
    summary = summarize(log.rows, startup_s)
    summary.update(policy_path=final, metrics_path=str(log.path))
    if cfg.logging.plot and log.rows:
        summary["plot_path"] = str(plot(log.rows, out / "reward_kl.png", PLOT_KEYS))
    print(report(summary), flush=True)
    return summary


def report(summary: dict) -> str:
    k = summary["average_over"]
    lines = [
        f"done: {summary['iterations']} iterations, {summary['seconds_per_iteration']:.2f} s each "
        f"(+{summary['startup_s']:.1f} s to start the actors)",
        f"gold reward: {summary['gold_reward_first']:.3f} (first {k} iterations) -> "
        f"{summary['gold_reward_last']:.3f} (last {k})",
        f"reward:      {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}; KL to reference at the end "
        f"{summary['kl_last']:.4f}",
        f"metrics: {summary['metrics_path']}",
    ]
    if summary.get("plot_path"):
        lines.append(f"plot:    {summary['plot_path']}")
    if summary.get("policy_path"):
        lines.append(f"policy:  {summary['policy_path']} (Hugging Face format)")
    return "\n".join(lines)


def train(cfg, groups, sampler, kl_ctl, log: MetricsLog) -> str | None:
    """The loop; returns where the final policy was saved."""
    sync = WeightPush(cfg, groups["policy"], groups["rollout"])
    start, version = resume(cfg, groups, sampler, kl_ctl, sync) if cfg.checkpoint.resume else (0, 0)
    log.truncate(start)
    progress = _progress(cfg)
    compute_columns(groups)  # clears the actors' compute ledgers: start-up is not part of the first iteration
    early = sync_in_train(cfg, sync)
    for it in range(start, cfg.train.iterations):
        t_it = time.perf_counter()
        row = iteration(cfg, groups, sampler, kl_ctl, it, version, sync=sync if early else None)
        version += 1
        if not early:
            row.update(sync.push(version))
        row["time/iteration"] = sum(v for k, v in row.items() if k.startswith("time/"))
        row.update(compute_columns(groups, row, time.perf_counter() - t_it, sync_overlapped=early))
        log.log(row)
        progress(it, row)
        if cfg.checkpoint.save_every and (it + 1) % cfg.checkpoint.save_every == 0:
            save_checkpoint(cfg, groups, sampler, kl_ctl, it + 1, version)
    if not cfg.checkpoint.save_final:
        return None
    final = str(Path(cfg.output_dir) / "policy")
    groups["policy"].call("save_hf", final).get()
    return final


def sync_in_train(cfg, sync) -> bool:
    """Queue the object-store push right behind the policy's training, on its actor, instead of after the train
    phase: the driver's round trip between the train results and the export goes (about 2 ms of the ~25 ms of
    overhead per iteration of the tiny CPU job), and the push hides behind the critic's training where that is the
    longer one. Not when rollout engines sleep between rollouts: waking one while colocated learners still train is
    the memory spike sleep mode exists to avoid."""
    return sync.name == "object_store" and not cfg.generation.enable_sleep


def compute_columns(groups, row: dict | None = None, wall_s: float = 0.0, sync_overlapped: bool = False) -> dict:
    """Actor-side compute, peak memory and orchestration overhead of the iteration just done (trainers/timing.py).
    One call per group, all in flight at once, after the iteration's clock stopped; it resets the actors' ledgers."""
    t0 = time.perf_counter()
    stats = collect_compute_stats(groups)
    if row is None:
        return {}
    chains = timing.SYNC_IN_TRAIN if sync_overlapped else timing.CHAINS
    out = timing.iteration_metrics(stats, wall_s, {p: row[f"time/{p}"] for p in timing.DRIVER_PHASES}, chains)
    out["overhead/stats_s"] = time.perf_counter() - t0  # the cost of measuring, outside time/wall
    return out


def save_checkpoint(cfg, groups, sampler, kl_ctl, next_iteration: int, version: int) -> None:
    """Learner states first, the driver's state last: only a checkpoint with driver.json is complete."""
    path = checkpoint_root(cfg.output_dir) / f"iter_{next_iteration}"
    for role in LEARNER_ROLES:
        if role in groups:
            groups[role].call("save_checkpoint", str(path / role)).get()
    state = {"next_iteration": next_iteration, "version": version, "sampler": sampler.state_dict(), "kl_coef": kl_ctl.value}
    save_driver_state(path, state)
    prune(cfg.output_dir, keep=cfg.checkpoint.keep)


def resume(cfg, groups, sampler, kl_ctl, sync) -> tuple[int, int]:
    """Restores the newest complete checkpoint and pushes its weights to the rollout; (0, 0) when there is none."""
    path = latest_checkpoint(cfg.output_dir)
    if path is None:
        print(f"checkpoint.resume: no checkpoint under {cfg.output_dir}/checkpoints; starting from iteration 0")
        return 0, 0
    for role in LEARNER_ROLES:
        if role in groups:
            groups[role].call("load_checkpoint", str(path / role)).get()
    state = load_driver_state(path)
    sampler.load_state_dict(state["sampler"])
    kl_ctl.value = state["kl_coef"]
    sync.push(state["version"])
    print(f"resumed from {path}: next iteration {state['next_iteration']}, policy version {state['version']}")
    return state["next_iteration"], state["version"]


def iteration(cfg, groups, sampler, kl_ctl, it: int, version: int, sync=None) -> dict:
    """One PPO iteration: generate, score in parallel, advantages, train, and report. With ``sync``, the new
    weights (version + 1) are pushed during the train phase, queued right behind the policy's training."""
    timer = _Timer()
    prompts = sampler.next_batch()
    with timer("generate"):
        batch = groups["rollout"].scatter("generate", prompts, it).batch()
        if cfg.generation.enable_sleep:  # free the engines' memory for the learners; the next push wakes them
            groups["rollout"].call("sleep").get()
    with timer("score"):  # reward, reference, critic and the learner's own log-probs, all in flight at once
        pending = {
            "reward": groups["reward"].scatter("score", batch),
            "reference": groups["reference"].scatter("logprobs", batch),
            "policy": groups["policy"].scatter("logprobs", batch),
        }
        if "critic" in groups:
            pending["critic"] = groups["critic"].scatter("values", batch)
        batch = merge_columns(batch, *(p.batch() for p in pending.values()))
    with timer("advantages"):
        batch, adv_stats = compute_advantages(batch, cfg.algo, kl_ctl.value)
    with timer("train"):
        trains = [groups["policy"].scatter("train", batch)]
        if "critic" in groups:
            trains.append(groups["critic"].scatter("train", batch))
        # the push's own clock overlaps the train phase: kept out of time/* (which add up to the iteration)
        pushed = {k.replace("time/", "overlapped/"): v for k, v in sync.push(version + 1).items()} if sync else {}
        train_stats = {}
        for t in trains:
            train_stats.update(_mean_dicts(t.get()))
    kl_ctl.update(adv_stats["kl"], len(batch))
    stats = _batch_stats(batch)
    check_fresh_weights(batch, version, stats["logprob_mismatch"], cfg.sync.max_logprob_mismatch)
    return {
        "iteration": it,
        "policy_version": version,
        **stats,
        **adv_stats,
        **train_stats,
        **pushed,
        **timer.times,
    }


def check_fresh_weights(batch: pa.RecordBatch, version: int, mismatch: float, limit: float) -> None:
    """Stale weights are an error, not a curiosity (TRL #5312): every sample must come from the current version,
    and the engine's log-probs must agree with the learner's for the same tokens."""
    versions = set(batch.column(S.POLICY_VERSION).to_pylist())
    if versions != {version}:
        raise RuntimeError(f"samples carry policy versions {sorted(versions)}, expected only {version}: a rollout "
                           f"actor missed a weight sync")
    if mismatch > limit:
        raise RuntimeError(
            f"rollout and learner log-probs differ by {mismatch:.4f} per token on average (limit "
            f"sync.max_logprob_mismatch={limit}): the rollout engine is not running the learner's weights"
        )


def _batch_stats(batch: pa.RecordBatch) -> dict[str, float]:
    reward = batch.column(S.REWARD).to_numpy(zero_copy_only=False)
    gold = batch.column(S.GOLD_REWARD).to_numpy(zero_copy_only=False)
    rollout, mask = to_padded(batch, S.ROLLOUT_LOGPROBS, dtype=torch.float32)
    learner, _ = to_padded(batch, S.OLD_LOGPROBS, dtype=torch.float32)
    n_tokens = int(mask.sum())
    # Stale-weight guard: right after a sync the engine and the learner must agree on every token's log-prob.
    mismatch = float(((rollout - learner).abs() * mask).sum() / max(1, n_tokens))
    return {
        "reward_mean": float(np.mean(reward)),
        "reward_std": float(np.std(reward)),
        "gold_reward_mean": float(np.nanmean(gold)) if not np.all(np.isnan(gold)) else math.nan,
        "response_len": n_tokens / max(1, len(batch)),
        "generated_tokens": n_tokens,
        "logprob_mismatch": mismatch,
    }


def _mean_dicts(dicts: list[dict]) -> dict[str, float]:
    keys = dicts[0].keys()
    return {k: float(np.mean([d[k] for d in dicts])) for k in keys}


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[f"time/{name}"] = time.perf_counter() - self.t

        return _Span()


def _progress(cfg):
    bar = None
    if cfg.logging.progress_bar:
        bar = tqdm(total=cfg.train.iterations, desc="ppo", unit="it")

    def update(it: int, row: dict) -> None:
        line = f"iter {it}: " + console_line(row, CONSOLE_KEYS)
        if bar is not None:
            bar.write(line)
            bar.update(1)
        else:
            print(line, flush=True)

    return update


def summarize(rows: list[dict], startup_s: float) -> dict:
    """Start and end of the run, each averaged over a few iterations, so one lucky batch does not decide it."""
    k = max(1, min(5, len(rows) // 4))
    avg = lambda rs, key: float(np.mean([r[key] for r in rs])) if rs else math.nan
    return {
        "iterations": len(rows),
        "average_over": k,
        "startup_s": startup_s,
        "gold_reward_first": avg(rows[:k], "gold_reward_mean"),
        "gold_reward_last": avg(rows[-k:], "gold_reward_mean"),
        "reward_first": avg(rows[:k], "reward_mean"),
        "reward_last": avg(rows[-k:], "reward_mean"),
        "kl_last": avg(rows[-k:], "kl"),
        "seconds_per_iteration": avg(rows, "time/iteration"),
    }
