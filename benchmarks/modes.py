"""Schedules and layouts side by side: sync vs one_step_off (= async, staleness 1) vs async staleness 2 vs streamed
scoring vs the hybrid engine, for PPO with a critic and for GRPO, several seeds, interleaved in one run: samples/s,
tokens/s per device (NeMo-RL's definition), and the gold reward reached after the same number of samples (learning
must not suffer). A table on stdout; JSON in benchmarks/results/modes.json.

    python benchmarks/modes.py                       # both tiny CPU configs, 2 seeds, the configs' iteration counts
    python benchmarks/modes.py --seeds 3 --iters 40 --configs configs/grpo_tiny_cpu.yaml
    python benchmarks/modes.py --configs configs/grpo_tiny_cpu.yaml --seeds 3 --iters 80 --set train.policy_lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import throughput
from bench_common import ROOT, load_line, machine, table, write_json

MODES = {  # mode -> the overrides it runs with
    "sync": ["train.mode=sync"],
    # samples one version behind: the decoupled objective with truncated importance weights corrects for it
    "one_step_off": ["train.mode=one_step_off", "algo.off_policy=tis", "algo.tis_cap=2.0"],
    # async with max_staleness=1 is one_step_off (the same schedule, orchestration/schedules.py)
    "async_2": ["train.mode=async", "train.max_staleness=2", "algo.off_policy=tis", "algo.tis_cap=2.0"],
    # one_step_off with the rollout's decoding steps compiled (generation.compile)
    "one_step_off_compiled": [
        "train.mode=one_step_off",
        "algo.off_policy=tis",
        "algo.tis_cap=2.0",
        "generation.compile=true",
    ],
    # sync, each rollout actor's share in 3 parts scored as they land
    "stream_3": ["train.mode=sync", "train.stream_chunks=3"],
    # sync, the engine inside the policy learner's process (no rollout actors, weights in memory)
    "hybrid": ["train.mode=sync", "generation.hybrid_engine=true"],
}
CONFIGS = ("configs/tiny_cpu.yaml", "configs/grpo_tiny_cpu.yaml")
TAIL = 5  # iterations the end-of-run gold reward is averaged over


def one(config: str, mode: str, seed: int, iters: int | None, warmup: int, extra: list[str]) -> dict:
    from rlhf_dist.config import load_config

    n = iters or load_config(str(ROOT / config), extra).train.iterations
    name = f"modes_{Path(config).stem}_{mode}_s{seed}"
    res = throughput.bench(
        config, [*extra, *MODES[mode], f"seed={seed}"], warmup=warmup, iters=n - warmup, name=name, quiet=True
    )
    rows = [json.loads(line) for line in (ROOT / "runs" / "bench" / name / "metrics.jsonl").open()]
    per_device = [v for r in rows[warmup:] for k, v in r.items() if k.startswith("throughput/tokens_per_s_per_")]
    return {
        "config": config,
        "mode": mode,
        "seed": seed,
        "samples_per_s": res["samples_per_s"],
        "tokens_per_s_per_device": statistics.mean(per_device),
        "gold_end": statistics.mean(r["gold_reward_mean"] for r in rows[-TAIL:]),
        "max_staleness": max(r.get("staleness", 0) for r in rows),
        "load_after": res["load_avg_after"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the config's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run (e.g. the lr)")
    p.add_argument("--out", default="modes", help="results file name (benchmarks/results/OUT.json)")
    args = p.parse_args()
    info = machine()
    runs = [
        one(config, mode, seed, args.iters, args.warmup, args.set)
        for config in args.configs
        for seed in range(1, args.seeds + 1)
        for mode in args.modes  # interleaved: every seed runs each mode back to back
    ]
    lines = []
    for config in args.configs:
        base = [r for r in runs if r["config"] == config and r["mode"] == args.modes[0]]
        for mode in args.modes:
            rs = [r for r in runs if r["config"] == config and r["mode"] == mode]
            sps = statistics.mean(r["samples_per_s"] for r in rs)
            golds = [r["gold_end"] for r in rs]
            lines.append(
                [
                    Path(config).stem,
                    mode,
                    sps,
                    sps / statistics.mean(r["samples_per_s"] for r in base),
                    statistics.mean(r["tokens_per_s_per_device"] for r in rs),
                    f"{statistics.mean(golds):.3f} ({', '.join(f'{g:.2f}' for g in golds)})",
                    max(r["max_staleness"] for r in rs),
                ]
            )
    print(f"{len(runs)} runs, {args.seeds} seed(s) each, modes interleaved; before: {load_line(info)}")
    headers = [
        "config",
        "mode",
        "samples/s",
        "vs sync",
        "tokens/s/device",
        "gold reward at the end (seeds)",
        "staleness",
    ]
    print(table(headers, lines))
    path = write_json(args.out, {"machine": info, "args": vars(args), "runs": runs})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
