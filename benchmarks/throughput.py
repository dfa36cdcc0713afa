"""Throughput of one config: K measured iterations after W warm-up ones; a table on stdout and JSON on disk.

    python benchmarks/throughput.py                                  # configs/tiny_cpu.yaml, the CPU default
    python benchmarks/throughput.py configs/grpo_tiny_cpu.yaml --iters 30 train.prompts_per_iteration=16
    rlhf-dist bench configs/tiny_cpu.yaml --warmup 3 --iters 20      # the same through the CLI

Reports samples/s, generated tokens/s, trained tokens/s, seconds per phase, peak memory per role and the
orchestration overhead (the share of an iteration outside model compute; see rlhf_dist/trainers/timing.py). Writes
benchmarks/results/<name>.json (name: throughput_<config name> unless --name is given). The run's own metrics go to
runs/bench/<name>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, mean, overhead_share, table, write_json  # noqa: E402
from ray_cpu import RayProcessCPU  # noqa: E402

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"
DEFAULT_WARMUP, DEFAULT_ITERS = 5, 50

# (label, metrics key or keys summed) for the per-stage table; compute/* are seconds inside the actors' methods.
STAGES = (
    ("generate", ("compute/rollout/generate",)),
    ("score (reward)", ("compute/reward/score",)),
    ("reference log-probs", ("compute/reference/logprobs",)),
    ("policy log-probs", ("compute/policy/logprobs",)),
    ("values", ("compute/critic/values",)),
    ("advantages (driver)", ("time/advantages",)),
    ("train policy", ("compute/policy/train",)),
    ("train critic", ("compute/critic/train",)),
    ("weight sync (learner's push, the rollout's load inside it)", ("compute/policy/push_weights",)),
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML (default {DEFAULT_CONFIG})")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. roles.rollout.num_actors=2"
    )
    p.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"iterations not measured (default {DEFAULT_WARMUP})"
    )
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"measured iterations (default {DEFAULT_ITERS})")
    p.add_argument("--name", default=None, help="result name (default throughput_<config name>)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")


def bench(
    config: str = DEFAULT_CONFIG,
    overrides: list[str] | tuple = (),
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    name: str | None = None,
    out: str | None = None,
    quiet: bool = False,
) -> dict:
    """Run the job, summarise the measured iterations, print the tables, write the JSON; returns the result."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_dist.config import load_config
    from rlhf_dist.trainers.ppo import run

    if not Path(config).exists() and (ROOT / config).exists():
        config = str(ROOT / config)
    probe = load_config(config, list(overrides))
    name = name or f"throughput_{probe.name}"
    forced = [
        f"train.iterations={warmup + iters}",
        f"output_dir={ROOT / 'runs' / 'bench' / name}",
        "logging.progress_bar=false",
        "logging.plot=false",
        "checkpoint.save_final=false",
        "checkpoint.save_every=0",
        "checkpoint.resume=false",
        "checkpoint.overwrite=true",  # a rerun of the same name replaces its rows
    ]
    cfg = load_config(config, [*overrides, *forced])
    before = machine()
    t0 = time.perf_counter()
    # the first measured row closes the last warm-up iteration: Ray's processes are read from there on
    with RayProcessCPU(Path(cfg.output_dir) / cfg.logging.metrics_file, warmup, warmup + iters) as ray_cpu:
        summary = run(cfg)
    total_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in Path(summary["metrics_path"]).read_text().splitlines() if line.strip()]
    result = {
        "name": name,
        "config": config,
        "overrides": list(overrides),
        "warmup": warmup,
        "iterations": iters,
        "machine": before,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "startup_s": summary["startup_s"],
        "total_s": total_s,
        "job": job_shape(cfg),
        **summarize(rows[warmup:], cfg, ray_cpu.per_iteration() if cfg.ray.address is None else {}),
    }
    path = write_json(name, result, out)
    if not quiet:
        print(render(result))
        print(f"\nresults: {path}")
    return result


def job_shape(cfg) -> dict:
    r = cfg.roles
    return {
        "estimator": cfg.algo.estimator,
        "prompts_per_iteration": cfg.train.prompts_per_iteration,
        "samples_per_prompt": cfg.generation.samples_per_prompt,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "ppo_epochs": cfg.train.ppo_epochs,
        "mini_batches": cfg.train.mini_batches,
        "generation_engine": cfg.generation.engine,
        "train_engine": cfg.train.engine,
        "zero_stage": cfg.train.zero_stage,
        "actors": {
            role: getattr(r, role).num_actors for role in ("rollout", "reward", "reference", "policy", "critic")
        },
    }


def summarize(rows: list[dict], cfg, ray_cpu: dict | None = None) -> dict:
    """Means over the measured iterations; rates are totals over total wall time (not means of ratios);
    ``ray_cpu``: what a local Ray's own processes burnt per iteration (``RayProcessCPU``)."""
    from rlhf_dist.trainers.timing import phase_overhead

    if not rows:
        raise ValueError("no measured iterations: raise --iters")
    wall = sum(r["time/wall"] for r in rows)
    samples = cfg.train.prompts_per_iteration * cfg.generation.samples_per_prompt * len(rows)
    generated = sum(r["generated_tokens"] for r in rows)
    stages = {
        label: mean(sum(r.get(k, 0.0) for k in keys) for r in rows)
        for label, keys in STAGES
        if any(k in rows[0] for k in keys)
    }
    critical = sum(r["compute/critical_path"] for r in rows)
    stages["idle (outside compute)"] = (wall - critical) / len(rows)
    phases = {}
    # weight_check: the stale-weight check after the push, only every sync.check_every iterations (a mean over all)
    for p in ("generate", "score", "advantages", "train", "weight_sync", "weight_check"):
        if any(f"time/{p}" in r for r in rows):
            phases[p] = {
                "wall_s": mean(r.get(f"time/{p}", 0.0) for r in rows),
                "critical_compute_s": mean(r.get(f"critical/{p}", 0.0) for r in rows),
            }
    overheads = [phase_overhead(r) for r in rows]
    for p in phases:
        phases[p]["overhead_s"] = mean(o.get(p, 0.0) for o in overheads)
    if "overlapped/weight_sync" in rows[0] and "train" in phases:  # the push was queued behind the policy's training
        phases = {("train + weight sync" if k == "train" else k): v for k, v in phases.items()}
    phases["between phases"] = {
        "wall_s": mean(o["between"] for o in overheads),
        "critical_compute_s": 0.0,
        "overhead_s": mean(o["between"] for o in overheads),
    }
    memory = {
        k.removeprefix("memory/").removesuffix("_mb").removesuffix("_peak"): max(r[k] for r in rows)
        for k in rows[0]
        if k.startswith("memory/")
    }
    return {
        "cpu": cpu_summary(rows, ray_cpu or {}),
        "seconds_per_iteration": wall / len(rows),
        "seconds_per_iteration_median": sorted(r["time/wall"] for r in rows)[len(rows) // 2],
        "samples_per_s": samples / wall,
        "generated_tokens_per_s": generated / wall,
        # response tokens that carry the policy loss, once per epoch
        "trained_tokens_per_s": generated * cfg.train.ppo_epochs / wall,
        "response_len_mean": mean(r["response_len"] for r in rows),
        "overhead_frac": 1.0 - critical / wall,
        "overhead_frac_per_iteration_mean": mean(r["overhead_frac"] for r in rows),
        # collecting the actors' ledgers after each iteration (the cost of measuring; part of the next time/wall)
        "stats_collect_s": mean(r.get("overhead/stats_s", float("nan")) for r in rows),
        "stages_s": stages,
        "phases": phases,
        "peak_memory_mb": memory,
        "gold_reward_last": rows[-1].get("gold_reward_mean"),
    }


def cpu_summary(rows: list[dict], ray_cpu: dict) -> dict:
    """CPU seconds per iteration (means of the ``cpu/`` columns, trainers/timing.py::cpu_metrics) with a local Ray's
    own processes added, and the orchestration's share of all of it: the driver outside its math, the actors outside
    their methods, Ray's processes. Where the cores are all busy, that share is what the orchestration takes from
    the compute, however its latencies are hidden."""
    from rlhf_dist.trainers.timing import orchestration_cpu_share

    if not rows or "cpu/driver" not in rows[0]:
        return {}
    per_it = {k.removeprefix("cpu/"): mean(r.get(k, 0.0) for r in rows) for k in rows[0] if k.startswith("cpu/")}
    per_it.pop("orchestration_frac", None)
    if "ray_processes_cpu_s" in ray_cpu:
        per_it["ray_processes"] = ray_cpu["ray_processes_cpu_s"]
        out_extra = {k: ray_cpu[k] for k in ("ray_processes_by_name_cpu_s", "started_during", "not_read_at_the_start")}
    else:
        out_extra = {}
    total = sum(per_it.values())
    share = orchestration_cpu_share(per_it)
    out = {"per_iteration_s": per_it, "total_s": total, "orchestration_s": share * total, **out_extra}
    out["orchestration_frac"] = share
    if "machine_busy_cpu_s" in ray_cpu:  # anything above our own total is another job's
        out["machine_busy_s"] = ray_cpu["machine_busy_cpu_s"]
    return out


def render(res: dict) -> str:
    j = res["job"]
    head = (
        f"{res['name']}: {res['config']} {' '.join(res['overrides'])}\n"
        f"{j['estimator']}, {j['prompts_per_iteration']} prompts x {j['samples_per_prompt']} samples, "
        f"{j['max_new_tokens']} new tokens, {j['ppo_epochs']} epoch(s) x {j['mini_batches']} mini-batch(es); "
        f"actors {j['actors']}; {res['iterations']} measured after {res['warmup']} warm-up iterations; "
        f"start-up {res['startup_s']:.1f} s\n{load_line(res['machine'])}, after: {res['load_avg_after']}"
    )
    rates = table(
        ["metric", "value"],
        [
            ["seconds / iteration", res["seconds_per_iteration"]],
            ["samples / s", res["samples_per_s"]],
            ["generated tokens / s", res["generated_tokens_per_s"]],
            ["trained tokens / s", res["trained_tokens_per_s"]],
            ["orchestration overhead", overhead_share(res["overhead_frac"])],
            ["measuring it (s / iteration, in the wall time)", res["stats_collect_s"]],
        ],
    )
    wall = res["seconds_per_iteration"]
    stages = table(
        ["stage (actor compute)", "s / iteration", "% of wall"],
        [[k, v, f"{100 * v / wall:.1f}"] for k, v in res["stages_s"].items()],
    )
    phases = table(
        ["driver phase", "wall s", "critical-path compute s", "overhead s"],
        [[k, v["wall_s"], v["critical_compute_s"], v["overhead_s"]] for k, v in res["phases"].items()],
    )
    memory = table(["role", "peak memory MiB"], [[k, v] for k, v in res["peak_memory_mb"].items()], floatfmt=".0f")
    return "\n\n".join([head, rates, stages, phases, memory, *render_cpu(res.get("cpu") or {})])


def render_cpu(cpu: dict) -> list[str]:
    """The CPU table: ms per iteration where the job's CPU went, and the orchestration's share."""
    if not cpu:
        return []
    names = {"driver": "driver (orchestration)", "driver_math": "driver's math (advantages)"}
    names["ray_processes"] = "Ray's processes (raylet, GCS, agents, idle workers)"
    rows = []
    for k, v in cpu["per_iteration_s"].items():
        label = names.get(k) or (f"{k.removesuffix('_outside')}: outside its methods" if k.endswith("_outside") else k)
        rows.append([label, 1000 * v])
    rows.append(["all of the job", 1000 * cpu["total_s"]])
    if "machine_busy_s" in cpu:
        rows.append(["the machine, every process", 1000 * cpu["machine_busy_s"]])
    rows.append(["orchestration's share of the job's CPU", overhead_share(cpu["orchestration_frac"])])
    return [table(["CPU (all actors of a role summed)", "ms / iteration"], rows, floatfmt=".1f")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    p.add_argument("--quiet", action="store_true", help="print nothing but the JSON path")
    a = p.parse_args(argv)
    res = bench(a.config, a.overrides, a.warmup, a.iters, a.name, a.out, quiet=a.quiet)
    if a.quiet:
        print(Path(a.out or ROOT / "benchmarks" / "results") / f"{res['name']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
