"""What experiment trackers add to a run's wall time: the default job (`rlhf-dist train`, the command a user types)
with `logging.trackers=[jsonl]` and with jsonl + TensorBoard + wandb (offline) + MLflow (local file store), rounds
interleaved A B B A so a drift in the machine's load falls on both. Per run: the command's wall time (start-up to
exit: tracker imports and their final flush included) and the iterations' summed `time/wall`. A table on stdout;
JSON in benchmarks/results/trackers.json.

    python benchmarks/trackers.py                    # 4 runs each, configs/tiny_cpu.yaml (80 iterations)
    python benchmarks/trackers.py --rounds 2 train.iterations=20
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

ARMS = {"jsonl only": "[jsonl]", "jsonl + tensorboard + wandb + mlflow": "[jsonl,tensorboard,wandb,mlflow]"}


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
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return {"trackers": trackers, "command_s": wall, "iterations_s": sum(r["time/wall"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both arms")
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--rounds", type=int, default=2, help="each round runs A B B A")
    args = p.parse_args()
    info = machine()
    names = list(ARMS)
    order = [n for _ in range(args.rounds) for n in (names[0], names[1], names[1], names[0])]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_trackers_") as tmp:
        for i, name in enumerate(order):
            runs.append({"arm": name, **one(args.config, args.overrides, ARMS[name], Path(tmp) / f"run{i}")})
            print(f"  {name}: {runs[-1]['command_s']:.1f} s", flush=True)
    rows = []
    base = {k: statistics.median(r[k] for r in runs if r["arm"] == names[0]) for k in ("command_s", "iterations_s")}
    for name in names:
        rs = [r for r in runs if r["arm"] == name]
        med = {k: statistics.median(r[k] for r in rs) for k in ("command_s", "iterations_s")}
        rows.append(
            [
                name,
                len(rs),
                med["command_s"],
                f"{100 * (med['command_s'] / base['command_s'] - 1):+.1f} %",
                ", ".join(f"{r['command_s']:.1f}" for r in rs),
                med["iterations_s"],
                f"{100 * (med['iterations_s'] / base['iterations_s'] - 1):+.1f} %",
            ]
        )
    after = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.config} {' '.join(args.overrides)}; before: {load_line(info)}; after: {after}")
    headers = ["trackers", "runs", "command s (median)", "vs jsonl", "each run s", "iterations s (median)", "vs jsonl"]
    print(table(headers, rows, floatfmt=".1f"))
    path = write_json("trackers", {"machine": info, "load_avg_after": after, "args": vars(args), "runs": runs})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
