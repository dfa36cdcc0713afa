"""What experiment trackers add to a run: the default job (`rlhf-dist train`, the command a user types) with
`logging.trackers=[jsonl]`, with each of TensorBoard, wandb (offline) and MLflow (local file store) beside it, and with
all three; every round runs the arms in one order and then the reverse, so a drift in the machine's load falls on all.

Per run: the command's wall time (start-up to exit: tracker imports and their final flush included), the iterations'
summed `time/wall`, and the CPU-seconds the whole machine was busy while it ran (/proc/stat: every process of the run,
wandb's service included; time the hypervisor stole for other machines is reported apart, not counted). On a 2-core
box shared with other work the wall time of the same run varies by 10 % or more, and on the box these numbers came
from the busy CPU-seconds moved with it (slower runs were busier), so neither resolves a few per cent in a few runs:
take many rounds, or bound a tracker's cost by its own CPU time. A table on stdout; JSON in
benchmarks/results/trackers.json.

    python benchmarks/trackers.py                    # 2 rounds, configs/tiny_cpu.yaml (80 iterations)
    python benchmarks/trackers.py train.iterations=20 --rounds 1 --arms jsonl all
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, load_line, machine, table, write_json

ARMS = {
    "jsonl": "[jsonl]",
    "tensorboard": "[jsonl,tensorboard]",
    "wandb": "[jsonl,wandb]",
    "mlflow": "[jsonl,mlflow]",
    "all": "[jsonl,tensorboard,wandb,mlflow]",
}


def cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU-seconds of this machine since boot, over all CPUs: busy is user, nice, system and interrupts
    (every process here); stolen is time the hypervisor gave other machines (on a shared VM: the noise, not ours)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def one(config: str, overrides: list[str], trackers: str, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "rlhf_dist.cli",
        "train",
        config,
        *overrides,
        f"logging.trackers={trackers}",
        f"output_dir={out}",
        "logging.progress_bar=false",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
    t0, (busy0, stolen0) = time.perf_counter(), cpu_s()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, (busy1, stolen1) = time.perf_counter() - t0, cpu_s()
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return {
        "trackers": trackers,
        "command_s": wall,
        "iterations_s": sum(r["time/wall"] for r in rows),
        "cpu_s": busy1 - busy0,
        "stolen_s": stolen1 - stolen0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every arm")
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS), help="the first is the baseline")
    p.add_argument("--rounds", type=int, default=2, help="each round runs the arms in order, then in reverse")
    args = p.parse_args()
    info = machine()
    order = [a for _ in range(args.rounds) for a in (*args.arms, *reversed(args.arms))]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_trackers_") as tmp:
        for i, arm in enumerate(order):
            runs.append({"arm": arm, **one(args.config, args.overrides, ARMS[arm], Path(tmp) / f"run{i}")})
            r = runs[-1]
            print(
                f"  {arm}: {r['command_s']:.1f} s, {r['cpu_s']:.1f} CPU-s busy, {r['stolen_s']:.1f} stolen", flush=True
            )
    keys = ("command_s", "cpu_s", "stolen_s")  # iterations_s is in the JSON only

    def median(arm: str) -> dict:
        return {k: statistics.median(r[k] for r in runs if r["arm"] == arm) for k in keys}

    base, rows = median(args.arms[0]), []
    for arm in args.arms:
        med, rs = median(arm), [r for r in runs if r["arm"] == arm]
        rows.append(
            [
                arm,
                len(rs),
                med["command_s"],
                f"{100 * (med['command_s'] / base['command_s'] - 1):+.1f} %",
                ", ".join(f"{r['command_s']:.1f}" for r in rs),
                med["cpu_s"],
                f"{100 * (med['cpu_s'] / base['cpu_s'] - 1):+.1f} %",
                ", ".join(f"{r['cpu_s']:.0f}" for r in rs),
                med["stolen_s"],
            ]
        )
    after = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.config} {' '.join(args.overrides)}; before: {load_line(info)}; after: {after}")
    headers = ["trackers", "runs", "wall s", "vs jsonl", "each run", "busy CPU-s", "vs jsonl", "each run", "stolen s"]
    print(table(headers, rows, floatfmt=".1f"))
    path = write_json("trackers", {"machine": info, "load_avg_after": after, "args": vars(args), "runs": runs})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
