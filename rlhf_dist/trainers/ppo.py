"""The PPO driver (and the critic-free family): it holds the algorithm; the actors hold the models."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from rlhf_dist import run_dir, trackers
from rlhf_dist.algo import AdaptiveKLController, FixedKLController
from rlhf_dist.checkpoint import (
    begin_checkpoint,
    checkpoint_identity,
    latest_checkpoint,
    load_driver_state,
    prune,
    save_driver_state,
)
from rlhf_dist.config import ROLE_TABLE, RunConfig, check_imports
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_in_order, merge_columns, to_padded
from rlhf_dist.data.prompts import PromptSampler, read_prompt_texts, tokenize_prompts
from rlhf_dist.metrics import MetricsLog, console_line, mean_of_dicts, plot
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.models.tiny import ensure_tiny_model
from rlhf_dist.orchestration.cluster import ray_session
from rlhf_dist.orchestration.launch import running_roles
from rlhf_dist.orchestration.phases import Phases
from rlhf_dist.orchestration.placement import plan, required_resources
from rlhf_dist.orchestration.reward_serve import serve_cpus, served_reward
from rlhf_dist.orchestration.role_group import (
    ActorDiedError,
    Pending,
    RoleGroup,
    collect_compute_stats,
    request_compute_stats,
)
from rlhf_dist.orchestration.schedules import Pipelined, make_schedule
from rlhf_dist.orchestration.weight_push import PushInFlight, WeightPush
from rlhf_dist.trainers import timing
from rlhf_dist.trainers.experience import compute_advantages
from rlhf_dist.trainers.stale_weights import (
    alarm_sample,
    check_fresh_weights,
    check_logprob_gap,
    logprob_mismatch,
    pushed_weight_stats,
)

CONSOLE_KEYS = (
    "reward_mean",
    "gold_reward_mean",
    "kl",
    "policy/clip_frac",
    "critic/value_loss",
    "response_len",
    "time/iteration",
)
PLOT_KEYS = ("reward_mean", "gold_reward_mean", "kl")
LEARNERS = tuple(r.name for r in ROLE_TABLE if r.learner)
# scorers whose answers do not depend on the policy's version: asked before the batch is needed (``InFlight``)
FROZEN_SCORERS = (("reward", "score"), ("reference", "logprobs"))


def scorer_roles(cfg: RunConfig, groups: dict[str, RoleGroup]) -> list[tuple[str, str]]:
    """``(role, method)`` of every scoring call on a batch, in the order their columns are merged: the frozen ones,
    then the learners' (the policy's old log-probs unless its loss takes its own, the critic's values)."""
    roles = list(FROZEN_SCORERS)
    if not cfg.train.skips_old_logprobs(cfg.algo):  # one on-policy step: the policy loss takes its own
        roles.append(("policy", "logprobs"))
    if "critic" in groups:
        roles.append(("critic", "values"))
    return roles


@dataclass
class InFlight:
    """An iteration's generation, in flight, and scoring calls chained on its results (``RoleGroup.chain``): they
    score the batch as soon as it exists, while the learners still train on the one before (pipelined modes) or the
    driver logs (sync), instead of after a round trip through the driver."""

    generation: Pending
    chainable: bool = True  # not in parts (the driver scores each as it lands), not with engines put to sleep
    prompts: pa.RecordBatch | None = None
    after: PushInFlight | None = None  # the push it waits for (``push_then_generate``)
    chained: dict[str, Pending] = field(default_factory=dict)  # role -> its call on the generation's results
    chained_on: list = field(default_factory=list)  # the generation's results they wait on

    def chain(self, groups: dict[str, RoleGroup], scorers: list[tuple[str, str]]) -> None:
        """Chains each of ``scorers`` not chained yet, except a role with more actors than the generation has
        results (some would idle). Sleeping engines free their memory only once the driver has the batch: nothing
        may run beside them before."""
        if not self.chainable or self.sent_again:
            return
        self.chained_on = list(self.generation.refs)
        for role, method in scorers:
            if role not in self.chained and len(groups[role]) <= len(self.chained_on):
                self.chained[role] = groups[role].chain(method, self.generation)

    @property
    def sent_again(self) -> bool:
        """Whether a part of the generation was sent again (a rollout actor restarted) after calls were chained."""
        return bool(self.chained_on) and self.chained_on != self.generation.refs

    def scores(self) -> dict[str, Pending]:
        """The chained calls; none if the generation was sent again: those wait on results that never come, and the
        batch is scored again."""
        return {} if self.sent_again else self.chained


@dataclass
class PPORun:
    """What a run carries from one iteration to the next; the actors hold everything heavy."""

    cfg: RunConfig
    groups: dict[str, RoleGroup]
    sampler: PromptSampler
    kl_ctl: AdaptiveKLController | FixedKLController
    sync: WeightPush
    iteration: int = 0  # the next one to run
    version: int = 0  # the policy version the rollout engines hold
    earlier_restarts: Counter = field(default_factory=Counter)  # counted before the roles last started
    schedule: Pipelined | None = None  # train.mode: when each batch is generated (Sync is one)
    sampler_before: dict[int, dict] = field(default_factory=dict)  # iteration -> sampler state before its prompts
    ledgers: dict[str, Pending] = field(default_factory=dict)  # this iteration's ledger calls sent so far
    drawn: dict[int, pa.RecordBatch] = field(default_factory=dict)  # iteration -> its prompts, drawn ahead

    @classmethod
    def start(
        cls, cfg: RunConfig, groups: dict[str, RoleGroup], sampler: PromptSampler, earlier_restarts: Counter = None
    ) -> PPORun:
        a = cfg.algo
        kl_ctl = (
            AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target else FixedKLController(a.kl_coef)
        )
        sync = WeightPush(cfg, groups["policy"], groups["rollout"])
        run = cls(cfg, groups, sampler, kl_ctl, sync, earlier_restarts=Counter(earlier_restarts or {}))
        run.schedule = make_schedule(cfg, run.start_generation)
        return run

    def start_generation(self, iteration: int, after: PushInFlight | None = None) -> InFlight:
        """Puts iteration ``iteration``'s prompts in generation on the rollout actors, which must hold at least the
        learners' current version by then (or, ``after`` a push in flight, the version it brings)."""
        prompts = self.prompts(iteration)
        parts = self.cfg.train.stream_chunks
        rollout, version = self.groups["rollout"], after.version if after else self.version
        landed = after.landed if after else None
        generation = rollout.scatter("generate", prompts, iteration, min_version=version, parts=parts, after=landed)
        chainable = parts == 1 and not self.cfg.generation.enable_sleep
        return InFlight(generation, chainable, prompts, after)

    def prompts(self, iteration: int) -> pa.RecordBatch:
        """Iteration ``iteration``'s prompts: drawn ahead (``draw_ahead``), or now."""
        return self.drawn.pop(iteration) if iteration in self.drawn else self.draw(iteration)

    def draw(self, iteration: int) -> pa.RecordBatch:
        """Iteration ``iteration``'s prompts: the next ones, as iterations draw in order; the sampler's state before
        them is kept for a checkpoint taken before their generation is learnt from."""
        self.sampler_before = {i: s for i, s in self.sampler_before.items() if i >= self.iteration}
        self.sampler_before[iteration] = self.sampler.state_dict()
        return self.sampler.next_batch()

    def draw_ahead(self) -> None:
        """Draws the prompts of the next iteration not drawn yet while the driver waits for the learners, so their
        generation goes out at the push without the draw (~0.5-1 ms) in between; one iteration ahead at most (a
        schedule that holds generation back for a fresh batch starts none at some pushes)."""
        nxt = max(self.sampler_before, default=self.iteration - 1) + 1
        if not self.drawn and nxt < self.cfg.train.iterations:
            self.drawn[nxt] = self.draw(nxt)

    def restarts(self) -> dict[str, int]:
        """``restarts/<role>``: actors Ray brought back; ``restarts/auto_resume``: whole-run resumes; so far."""
        now = {f"restarts/{g.name}": g.restarts for g in self.groups.values() if g.max_restarts}
        if self.cfg.checkpoint.max_auto_resume:
            now["restarts/auto_resume"] = 0
        return {k: self.earlier_restarts.get(k, 0) + n for k, n in now.items()}

    @property
    def learners(self) -> list[RoleGroup]:
        return [self.groups[r] for r in LEARNERS if r in self.groups]

    def push_during_train(self) -> bool:
        """Queue the object-store (or in-process) push right behind the policy's training, on its actor, instead of
        after the train phase: the driver's round trip between the train results and the push goes (about 2 ms of
        the ~25 ms of overhead per iteration of the tiny CPU job), and the push hides behind the critic's training
        where that is the longer one. Not when rollout engines sleep between rollouts: waking one while colocated
        learners still train is the memory spike sleep mode exists to avoid."""
        return self.sync.name in ("object_store", "in_process") and not self.cfg.generation.enable_sleep


def score(
    phases: Phases, scorers: list[tuple[RoleGroup, str]], batch: pa.RecordBatch, chained: dict | None = None
) -> list[Pending]:
    """Every scoring role's call on ``batch``, all in flight at once, in the order their columns are merged; a role
    in ``chained`` was asked already (``InFlight``)."""
    out, chained = [], chained or {}
    for group, method in scorers:
        if group.name in chained:
            phases.record(group.name, method)
            out.append(chained[group.name])
        else:
            out.append(phases.scatter(group, method, batch))
    return out


def prepare(cfg: RunConfig) -> PromptSampler:
    """Everything that can fail without a cluster fails here, before any actor starts."""
    ensure_tiny_model(cfg)
    check_imports(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    table = tokenize_prompts(read_prompt_texts(cfg), tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    return PromptSampler(table, cfg.train.prompts_per_iteration, cfg.generation.samples_per_prompt, cfg.seed)


@run_dir.claimed("train")
def run(cfg: RunConfig) -> dict:
    """Runs ``cfg.train.iterations`` iterations; returns a summary (paths, first/last metrics). output_dir is this
    run's alone from the start (rlhf_dist/run_dir.py), before anything is written or Ray starts."""
    sampler = prepare(cfg)
    out = Path(cfg.output_dir)
    # the trackers (logging.trackers) close with the plot at the end, or marked failed if the run raises
    with trackers.open_log(cfg, "train", out / cfg.logging.metrics_file, resume=cfg.checkpoint.resume) as log:
        roles_need = required_resources(plan(cfg))
        # reward.serve: the reward model's Serve application runs across auto-resumes, started (or shared) here
        with ray_session(cfg, min_cpus=roles_need["CPU"] + serve_cpus(cfg)), served_reward(cfg, roles_need):
            final, startup_s = train_resuming(cfg, sampler, log)
        summary = summarize(log.rows, startup_s)
        summary.update(policy_path=final, metrics_path=str(log.path))
        if cfg.logging.plot and log.rows:
            plotted = plot(log.rows, out / "reward_kl.png", PLOT_KEYS)
            summary["plot_path"] = str(plotted)
            log.artifact(plotted)
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


def train_resuming(cfg: RunConfig, sampler: PromptSampler, log: MetricsLog) -> tuple[str | None, float]:
    """``train`` on freshly started roles; when an actor dies for good (a learner, whose optimizer state and process
    group die with it, or an actor past its restarts) every role starts again and the run resumes from its last
    complete checkpoint (from the start without one), at most ``checkpoint.max_auto_resume`` times. Returns where
    the final policy went and the first start-up's seconds."""
    first_batch, earlier, startup_s = sampler.state_dict(), Counter(), None
    for attempt in range(cfg.checkpoint.max_auto_resume + 1):
        t0, run = time.perf_counter(), None
        try:
            with running_roles(cfg) as groups:
                startup_s = startup_s if startup_s is not None else time.perf_counter() - t0
                run = PPORun.start(cfg, groups, sampler, earlier_restarts=earlier)
                return train(run, log, from_checkpoint=cfg.checkpoint.resume or attempt > 0), startup_s
        except ActorDiedError as err:
            if attempt == cfg.checkpoint.max_auto_resume:
                raise ActorDiedError(f"{err} (checkpoint.max_auto_resume={attempt} resumes spent)") from err
            earlier = Counter(run.restarts() if run is not None else earlier)
            earlier["restarts/auto_resume"] += 1
            print(f"auto-resume {attempt + 1}/{cfg.checkpoint.max_auto_resume}: {err}; every role starts again")
            sampler.load_state_dict(first_batch)  # without a checkpoint the run starts over
    raise AssertionError("unreachable")


def train(run: PPORun, log: MetricsLog, from_checkpoint: bool = False) -> str | None:
    """The loop; returns where the final policy was saved."""
    cfg = run.cfg
    if from_checkpoint:
        resume(run)
    log.truncate(run.iteration)
    progress = _progress(cfg)
    collect_compute_stats(run.groups)  # empties the actors' ledgers: start-up is not part of the first iteration
    last_end, last_cpu = time.perf_counter(), time.process_time()
    while run.iteration < cfg.train.iterations:
        phases = Phases()
        row = iteration(run, phases)
        ledgers = close_iteration(run)
        end, cpu = time.perf_counter(), time.process_time()
        # an iteration's wall time runs from the end of the one before, as a clock between steps sees it: the driver's
        # bookkeeping after that one (the actors' ledgers, the metrics line, a checkpoint) is part of it
        row.update(timing_columns(run, phases, end - last_end, ledgers, cpu - last_cpu))
        last_end, last_cpu = end, cpu
        row.update(timing.throughput(row["total_tokens"], row["time/wall"], cfg.roles))
        log.log(row)
        progress(row)
        chain_scorers(run)
        if cfg.checkpoint.save_every and run.iteration % cfg.checkpoint.save_every == 0:
            save_checkpoint(run)
    if not cfg.checkpoint.save_final:
        return None
    final = str(Path(cfg.output_dir) / "policy")
    run.groups["policy"].call("save_hf", final).get()
    return final


def iteration(run: PPORun, phases: Phases) -> dict:
    """One PPO iteration: generate, score in parallel, advantages, train, push the new weights; the metrics row."""
    cfg, groups = run.cfg, run.groups
    own_old = cfg.train.skips_old_logprobs(cfg.algo)
    scorers = [(groups[role], method) for role, method in scorer_roles(cfg, groups)]
    with phases.phase("generate"):  # the schedule (train.mode) decides whether this batch was generated already
        phases.record(groups["rollout"].name, "generate")
        in_flight = run.schedule.generation(run.iteration, cfg.train.iterations)
        generation = in_flight.generation
        if cfg.train.stream_chunks > 1:  # every finished part goes to the scorers while the others generate
            parts = {i: (part, score(phases, scorers, part)) for i, part in generation.as_completed()}
        else:
            batch = generation.batch()
        if cfg.generation.enable_sleep:  # free the engines' memory for the learners; the next push wakes them
            phases.call(groups["rollout"], "sleep").get()
    with phases.phase("score"):  # reward, reference, critic and the learner's own log-probs, all in flight at once
        if cfg.train.stream_chunks > 1:
            merged = [
                merge_columns(part, *(p.batch() for p in scored)) for part, scored in map(parts.get, sorted(parts))
            ]
            batch = concat_in_order(merged, generation.index)
        else:
            pending = score(phases, scorers, batch, in_flight.scores())
        # then the stale-weight alarm's share of the batch, every sync.check_every iterations, if it came from the
        # learners' weights (else both sides score a sample after the push)
        at_version = own_old and min(batch.column(S.POLICY_VERSION).to_pylist()) == run.version
        sample = alarm_sample(batch, cfg, run.iteration, len(groups["policy"].actors)) if at_version else None
        sampled = phases.scatter(groups["policy"], "logprobs", sample, subset=True) if sample is not None else None
        if cfg.train.stream_chunks == 1:
            batch = merge_columns(batch, *(p.batch() for p in pending))
        sample = merge_columns(sample, sampled.batch()) if sampled is not None else None
    with phases.phase("advantages", on_driver=True):
        batch, adv_stats = compute_advantages(
            batch, cfg.algo, run.kl_ctl.value, on_nonfinite=cfg.train.on_nonfinite, iteration=run.iteration
        )
        stats = batch_stats(batch, run.version, sample)
        check_fresh_weights(batch, run.version, run.schedule.max_staleness, stats, cfg.sync.max_logprob_mismatch)
    # no sample of the learners' version was compared: both score one after the push
    check_after_push = not stats["logprob_checked_samples"] and cfg.sync.checks(run.iteration)
    check_after_push = check_after_push and cfg.generation.scores_responses()
    with phases.phase("train"):
        trains = [phases.scatter(group, "train", batch) for group in run.learners]
        # the roles with no call left in this iteration close their ledgers now, while the learners train, instead
        # of on the way from the push to the next generation (close_iteration)
        run.ledgers = request_compute_stats(done_roles(run))
        run.draw_ahead()
        pushed = push_then_generate(run, phases, put_ahead=not check_after_push) if run.push_during_train() else None
        train_stats = {k: v for t in trains for k, v in mean_of_dicts(t.get()).items()}
    row = {"iteration": run.iteration, "policy_version": run.version}
    if pushed is None:
        with phases.phase("weight_sync"):
            pushed = run.sync.push(run.version + 1, phases)
    else:  # its own clock overlaps the train phase: kept out of the phases, which add up to the iteration
        row["overlapped/weight_sync"] = pushed["seconds"]
    if check_after_push:
        with phases.phase("weight_check"):
            stats.update(check_pushed_weights(run, batch, phases))
    run.kl_ctl.update(adv_stats["kl"], len(batch))
    run.iteration, run.version = run.iteration + 1, run.version + 1
    return {**row, **stats, **adv_stats, **train_stats, "weight_sync_bytes": pushed["bytes"], **run.restarts()}


def push_then_generate(run: PPORun, phases: Phases, put_ahead: bool = True) -> dict[str, float]:
    """The push of the learners' next version, queued behind their training; with ``put_ahead``, the generating
    actors' ledger calls and what ``close_iteration`` would put in flight go out now too, held by Ray until the push
    has landed: the next generation starts as the push ends instead of a round trip through the driver later. A
    push that fails and is sent again voids them (they fail with it): taken back, for ``close_iteration`` to send."""
    push, rollout = run.sync.start(run.version + 1, phases), generating_role(run)
    if put_ahead:
        run.ledgers.update(request_compute_stats({rollout: run.groups[rollout]}, after=push.landed))
        run.schedule.put_ahead(run.iteration + 1, run.cfg.train.iterations, push)
    pushed = run.sync.finish(push)
    if pushed["again"]:
        run.ledgers.pop(rollout, None)
        for i, in_flight in run.schedule.drop(lambda started: started.after is push):
            run.drawn[i] = in_flight.prompts  # the same prompts go out again
    return pushed


def close_iteration(run: PPORun) -> dict[str, Pending]:
    """After an iteration's push: the generating actors' ledger calls, the next generation (train.mode's schedule)
    put in flight behind them (an actor answers its calls in order, so the ledgers hold this iteration alone) and
    beside the driver's bookkeeping of this iteration, unless ``push_then_generate`` sent them already; then the
    ledger calls not sent during the training (``done_roles``: the policy's; sending one takes ~0.4 ms) and the
    scorers chained on generations that were in flight before (``chain_scorers``). Returns the iteration's ledger
    calls, for ``timing_columns``."""
    rollout = generating_role(run)
    ledgers = dict(run.ledgers)
    if rollout not in ledgers:
        ledgers.update(request_compute_stats({rollout: run.groups[rollout]}))
    started_before = {i for i, _ in run.schedule.in_flight_until(run.cfg.train.iterations)}
    run.schedule.put_ahead(run.iteration, run.cfg.train.iterations)
    ledgers.update(request_compute_stats({role: g for role, g in run.groups.items() if role not in ledgers}))
    run.ledgers = {}
    chain_scorers(run, started_before)
    return ledgers


def chain_scorers(run: PPORun, only: set[int] | None = None) -> None:
    """Chains the scorers on the generations in flight (of ``only`` these iterations): every scorer on the next
    iteration's, the frozen ones also on the one after. ``close_iteration`` chains on generations started before it
    (they may be done: their scoring goes now); ``train`` the rest after its bookkeeping, so a generation just started
    does not wait behind the calls (~0.4 ms each to send) of scorers it will not need for tens of ms."""
    for i, in_flight in run.schedule.in_flight_until(run.iteration + 1):
        if only is None or i in only:
            # the learners' scoring only on the next batch: their state is final for it now, not yet for later ones
            in_flight.chain(run.groups, scorer_roles(run.cfg, run.groups) if i == run.iteration else FROZEN_SCORERS)


def generating_role(run: PPORun) -> str:
    """The group whose actors generate: the rollout's, or a hybrid's policy (the rollout group is its view)."""
    return run.groups["rollout"].view_of or "rollout"


def done_roles(run: PPORun) -> dict[str, RoleGroup]:
    """The groups that get no more calls in this iteration once the learners' training is sent: all but the
    generating actors (the push reaches them) and the policy (it pushes, and may score for the weight check)."""
    busy = {generating_role(run), "policy"}
    return {role: g for role, g in run.groups.items() if role not in busy}


def check_pushed_weights(run: PPORun, batch: pa.RecordBatch, phases: Phases) -> dict[str, float]:
    """Right after the push of ``run.version + 1``: every rollout engine and the policy score the same sample of the
    batch just trained on; raises unless they agree (trainers/stale_weights.py)."""
    ranks = len(run.groups["policy"].actors)
    sample = alarm_sample(batch, run.cfg, run.iteration, ranks).select([S.PROMPT_IDS, S.RESPONSE_IDS])
    engines = phases.call(run.groups["rollout"], "engine_logprobs", sample)
    learner = phases.scatter(run.groups["policy"], "logprobs", sample, subset=True)
    stats = pushed_weight_stats(engines.get(), learner.batch(), run.version + 1)
    check_logprob_gap(stats, run.cfg.sync.max_logprob_mismatch)
    return stats


def timing_columns(
    run: PPORun, phases: Phases, wall_s: float, ledgers: dict[str, Pending], driver_cpu_s: float
) -> dict[str, float]:
    """Wall time per phase, and the actors' compute, peak memory, CPU time and the orchestration overhead of the
    iteration just done (trainers/timing.py), from its ``ledgers`` (``close_iteration``); reading them empties them."""
    out = {f"time/{p}": s for p, s in phases.seconds.items()}
    out["time/iteration"] = phases.total()
    t0 = time.perf_counter()
    stats = collect_compute_stats(run.groups, ledgers)
    out.update(timing.iteration_metrics(stats, wall_s, phases.chains(), phases.driver_seconds()))
    out.update(timing.cpu_metrics(stats, driver_cpu_s, sum(phases.driver_cpu.values())))
    out["overhead/stats_s"] = time.perf_counter() - t0  # the cost of measuring, in the next iteration's time/wall
    return out


def save_checkpoint(run: PPORun) -> None:
    """Learner states first, the driver's state last: only a checkpoint with driver.json is complete. It names the run
    (run_id, defining keys), so resume and pruning never take another run's."""
    cfg = run.cfg
    rd = run_dir.current(cfg.output_dir, "train")
    path = begin_checkpoint(cfg.output_dir, run.iteration, run_id=rd.run_id)
    for group in run.learners:
        group.call("save_checkpoint", str(path / group.name)).get()
    save_driver_state(
        path,
        {
            "next_iteration": run.iteration,
            "version": run.version,
            # where the prompts of the next iteration start: one whose generation is in flight is drawn again
            "sampler": run.sampler_before.get(run.iteration, run.sampler.state_dict()),
            "kl_coef": run.kl_ctl.value,
            "run_id": rd.run_id,
            "defining": rd.defining,
        },
    )
    prune(cfg.output_dir, keep=cfg.checkpoint.keep, run_id=rd.run_id)


def resume(run: PPORun) -> None:
    """Restores this run's newest complete checkpoint and pushes its weights to the rollout; starts at 0 without one.
    Another run's checkpoints (another run_id) are not looked at; one without a run_id only in a dir this run adopted
    from an older version."""
    cfg = run.cfg
    rd = run_dir.current(cfg.output_dir, "train")
    path = latest_checkpoint(cfg.output_dir, run_id=rd.run_id, accept_unowned=rd.adopted_legacy)
    if path is None:
        print(
            f"checkpoint.resume: no checkpoint of run {rd.run_id} under {cfg.output_dir}/checkpoints; starting from 0"
        )
        return
    saved = checkpoint_identity(path)["defining"]
    if saved is not None:  # the manifest agreed when the run started; the checkpoint must too
        run_dir.check_defining(saved, rd.defining, f"checkpoint {path}")
    for group in run.learners:
        group.call("load_checkpoint", str(path / group.name)).get()
    state = load_driver_state(path)
    run.sampler.load_state_dict(state["sampler"])
    run.kl_ctl.value = state["kl_coef"]
    run.iteration, run.version = state["next_iteration"], state["version"]
    run.sync.push(run.version)
    print(f"resumed from {path}: next iteration {run.iteration}, policy version {run.version}")


def batch_stats(batch: pa.RecordBatch, version: int, sample: pa.RecordBatch | None = None) -> dict[str, float]:
    """The batch's metrics; the log-prob gap over its ``old_logprobs``, else over ``sample`` (a part of it with the
    learner's log-probs: alarm_sample), else none is checked (``logprob_checked_samples`` 0)."""
    reward = batch.column(S.REWARD).to_numpy(zero_copy_only=False)
    skipped = np.isnan(reward).any()  # train.on_nonfinite=skip leaves NaN on the samples it dropped
    mean, std = (np.nanmean, np.nanstd) if skipped else (np.mean, np.std)
    gold = batch.column(S.GOLD_REWARD).to_numpy(zero_copy_only=False)
    mask = to_padded(batch, S.ROLLOUT_LOGPROBS, dtype=torch.float32)[1]
    n_tokens = int(mask.sum())
    checked = batch if S.OLD_LOGPROBS in batch.schema.names else sample
    mismatch, n_checked = logprob_mismatch(checked, version) if checked is not None else (math.nan, 0)
    return {
        "reward_mean": float(mean(reward)),
        "reward_std": float(std(reward)),
        "gold_reward_mean": float(np.nanmean(gold)) if not np.all(np.isnan(gold)) else math.nan,
        "response_len": n_tokens / max(1, len(batch)),
        "generated_tokens": n_tokens,
        "total_tokens": timing.batch_tokens(batch),  # prompts and responses: the throughput's numerator
        "logprob_mismatch": mismatch,
        "logprob_checked_samples": n_checked,
        "staleness": int(version - batch.column(S.POLICY_VERSION).to_numpy(zero_copy_only=False).min()),
    }


def _progress(cfg):
    bar = None
    if cfg.logging.progress_bar:
        bar = tqdm(total=cfg.train.iterations, desc="ppo", unit="it")

    def update(row: dict) -> None:
        line = f"iter {row['iteration']}: " + console_line(row, CONSOLE_KEYS)
        if bar is not None:
            bar.write(line)
            bar.update(1)
        else:
            print(line, flush=True)

    return update


def summarize(rows: list[dict], startup_s: float) -> dict:
    """Start and end of the run, each averaged over a few iterations, so one lucky batch does not decide it."""
    k = max(1, min(5, len(rows) // 4))

    def avg(rs: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rs])) if rs else math.nan

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
