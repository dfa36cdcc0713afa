"""The same job with 1, 2, 4 rollout actors and 1, 2 learners (policy and critic ranks): a table and JSON.

    python benchmarks/scaling.py                                        # configs/tiny_cpu.yaml on this CPU
    python benchmarks/scaling.py --rollouts 1,2 --learners 1 --iters 10
    python benchmarks/scaling.py configs/qwen0.5b_1x8_vllm.yaml --rollouts 1,2,4 --learners 1,2,4   # a GPU node

Each cell is one ``benchmarks/throughput.py`` run in its own process (its own Ray instance), so cells do not share
warm state. With L learners the policy and the critic each get L data-parallel ranks (DeepSpeed ZeRO over gloo on
CPU); the global batch stays the same, so more actors split the same work. On a 2-core CPU more actors cannot add
compute: the table measures what the extra actors cost (start-up, scatter/gather, collectives), not a speed-up.
On a GPU node pass a GPU config; its roles' num_gpus are kept, only the actor counts change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--rollouts", default="1,2,4")
    p.add_argument("--learners", default="1,2")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--name", default="scaling")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole grid this many times, cells interleaved, and "
        "report each cell's median run (a shared CPU is noisy)",
    )
    a = p.parse_args(argv)

    from rlhf_dist.config import load_config

    base = load_config(a.config, a.overrides)
    other = {r: getattr(base.roles, r).num_actors for r in ("reward", "reference")}
    has_critic = base.roles.critic.num_actors > 0
    info = machine()
    runs: dict[tuple[int, int], list[dict]] = {}
    grid = [(r, n) for n in (int(x) for x in a.learners.split(",")) for r in (int(x) for x in a.rollouts.split(","))]
    for _ in range(a.rounds):
        for rollouts, learners in grid:
            name = f"{a.name}_r{rollouts}_l{learners}"
            actors = rollouts + learners * (2 if has_critic else 1) + sum(other.values())
            overrides = [
                *a.overrides,
                f"roles.rollout.num_actors={rollouts}",
                f"roles.policy.num_actors={learners}",
                f"ray.num_cpus={max(actors, int(base.ray.num_cpus or 0))}",
            ]
            if has_critic:
                overrides.append(f"roles.critic.num_actors={learners}")
            print(f"{name}: {' '.join(overrides)}", flush=True)
            cmd = [
                sys.executable,
                str(ROOT / "benchmarks" / "throughput.py"),
                a.config,
                *overrides,
                "--warmup",
                str(a.warmup),
                "--iters",
                str(a.iters),
                "--name",
                name,
                "--quiet",
            ]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                runs.setdefault((rollouts, learners), []).append(
                    {"rollouts": rollouts, "learners": learners, "error": proc.stderr[-600:]}
                )
                continue
            r = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
            runs.setdefault((rollouts, learners), []).append(
                {
                    "rollouts": rollouts,
                    "learners": learners,
                    "actors": actors,
                    **{
                        k: r[k]
                        for k in (
                            "seconds_per_iteration",
                            "samples_per_s",
                            "generated_tokens_per_s",
                            "trained_tokens_per_s",
                            "overhead_frac",
                            "startup_s",
                            "stages_s",
                            "phases",
                            "peak_memory_mb",
                            "machine",
                            "load_avg_after",
                        )
                    },
                }
            )
            print(
                f"  {r['seconds_per_iteration']:.3f} s/iteration, overhead {100 * r['overhead_frac']:.1f} %, "
                f"start-up {r['startup_s']:.1f} s, load before {r['machine']['load_avg_1_5_15']} after "
                f"{r['load_avg_after']}",
                flush=True,
            )
    cells = []
    for key in grid:
        ok = sorted((c for c in runs.get(key, []) if "error" not in c), key=lambda c: c["seconds_per_iteration"])
        if not ok:
            cells.append(runs[key][-1])
            continue
        cell = dict(ok[(len(ok) - 1) // 2])  # the median run (the lower one of an even count)
        cell["seconds_per_iteration_runs"] = [c["seconds_per_iteration"] for c in runs[key] if "error" not in c]
        cells.append(cell)
    res = {
        "config": a.config,
        "overrides": a.overrides,
        "warmup": a.warmup,
        "iterations": a.iters,
        "machine": info,
        "rounds": a.rounds,
        "cells": cells,
    }
    path = write_json(a.name, res)
    print(render(res))
    print(f"\nresults: {path}")
    return 0


def render(res: dict) -> str:
    rows = []
    for c in res["cells"]:
        if "error" in c:
            rows.append([c["rollouts"], c["learners"], "failed"] + [None] * 8)
            continue
        ph = c["phases"]
        rows.append(
            [
                c["rollouts"],
                c["learners"],
                c["actors"],
                c["seconds_per_iteration"],
                " ".join(f"{x:.3f}" for x in c["seconds_per_iteration_runs"]),
                c["samples_per_s"],
                c["generated_tokens_per_s"],
                f"{100 * c['overhead_frac']:.1f}",
                ph["generate"]["wall_s"],
                (ph.get("train") or ph["train + weight sync"])["wall_s"],
                c["startup_s"],
            ]
        )
    head = (
        f"scaling: {res['config']} {' '.join(res['overrides'])}; {res['iterations']} measured iterations after "
        f"{res['warmup']} per cell, {res['rounds']} round(s), the median run per cell; "
        f"{load_line(res['machine'])}"
    )
    return (
        head
        + "\n\n"
        + table(
            [
                "rollouts",
                "learners",
                "actors",
                "s / iteration",
                "every round",
                "samples / s",
                "generated tokens / s",
                "overhead %",
                "generate s",
                "train (+ sync) s",
                "start-up s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
