"""Faults injected into a running `rlhf-dist train` job, one run per fault beside an uninterrupted run: what the run
did, what the fault cost in wall time (time to recover), and whether every non-timing metric equals the
uninterrupted run's. A table on stdout; JSON in benchmarks/results/healing.json.

    python benchmarks/healing.py                     # the tiny CPU job, 8 iterations, a checkpoint every 2
    python benchmarks/healing.py --iters 12 --faults rollout driver

Each fault is a SIGKILL, from outside, to one process of the job's own process tree once the metrics file has
``--kill-after`` rows: the driver (a child of `rlhf-dist train`, its supervisor) or a role's actor process, found by
the title Ray gives it (``ray::RolloutWorker``...). Nothing outside the job is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, table, write_json  # noqa: E402

from rlhf_dist.trainers.timing import TIMING_PREFIXES  # noqa: E402

FAULTS = {  # name -> the process killed
    "rollout": "ray::RolloutWorker",
    "reward": "ray::RewardWorker",
    "reference": "ray::ReferenceWorker",
    "policy": "ray::PolicyWorker",
    "critic": "ray::CriticWorker",
    "driver": "driver",
}
# what a fault may change: how long things took and how often something was restarted
NOT_COMPARED = (*TIMING_PREFIXES, "restarts/")
# what the run printed about healing, for the "what the run did" column
HEAL_LINES = re.compile(r"restarted \(\d+ so far\)|auto-resume \d+/\d+|was killed by \w+; resuming|resumed from \S+")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def victim(job: subprocess.Popen, target: str) -> int | None:
    if target == "driver":
        kids = descendants(job.pid)
        return kids[0] if kids else None
    return next((p for p in descendants(job.pid) if title(p).startswith(target)), None)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


ROLE_OF = {title: role for role, title in FAULTS.items() if role != "driver"}


def restart_lines(log_path: Path, role: str | None) -> int:
    """How many "role <role> actor N restarted" lines the run has printed so far."""
    if role is None or not log_path.exists():
        return 0
    return len(re.findall(rf"role {role} actor \d+ restarted", log_path.read_text(errors="replace")))


def healed(log_path: Path, in_flight: tuple, logged: int) -> bool:
    """A killed actor is healed once the run says it restarted it: a restart between two of its calls is seen at
    the end of an iteration (its ledger's new pid), maybe the one after the iteration in flight at the kill. Two more
    rows without the line: not noticed (the run's log shows it). The driver: once the iteration is logged again."""
    rows_then, _, role, lines_then = in_flight
    return role is None or restart_lines(log_path, role) > lines_then or logged > rows_then + 2


def run_job(out: Path, iters: int, kills: list[tuple[int, str]], extra: list[str]) -> dict:
    """`rlhf-dist train` on the tiny job into `out`; for each (rows, target) of `kills`, once the metrics file has
    that many rows, SIGKILLs the target (a FAULTS value) in the job's process tree, then waits until the iteration
    that was in flight is logged (after a resume, logged again): the seconds in between are its time to recover;
    before the next kill, also until the run has said it restarted a killed actor (``healed``)."""
    overrides = [
        f"output_dir={out}",
        f"train.iterations={iters}",
        "checkpoint.save_every=2",
        "checkpoint.save_final=false",
        "checkpoint.overwrite=true",
        "logging.progress_bar=false",
        "logging.plot=false",
        *extra,
    ]
    log_path = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, todo, killed = time.monotonic(), list(kills), []
    with log_path.open("w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "rlhf_dist.cli", "train", "configs/tiny_cpu.yaml", *overrides],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            in_flight = None  # (rows logged, kill time, role, its restart lines) of the last kill until healed
            while (todo or in_flight) and job.poll() is None:
                logged = len(rows(out / "metrics.jsonl"))
                if in_flight is not None:
                    if logged > in_flight[0] and len(killed[-1]) == 2:  # the iteration in flight is logged
                        killed[-1] = (*killed[-1], time.monotonic() - in_flight[1])
                    if len(killed[-1]) == 3 and healed(log_path, in_flight, logged):
                        in_flight = None
                elif logged >= todo[0][0] and (pid := victim(job, todo[0][1])):
                    role = ROLE_OF.get(todo[0][1])
                    os.kill(pid, signal.SIGKILL)
                    in_flight = (logged, time.monotonic(), role, restart_lines(log_path, role))
                    killed.append((todo.pop(0)[1], in_flight[1] - t0))
                time.sleep(0.05)
            rc = job.wait(timeout=1800)
        finally:
            if job.poll() is None:
                for pid in descendants(job.pid):
                    os.kill(pid, signal.SIGKILL)
                job.kill()
    text = log_path.read_text()
    return {
        "rc": rc,
        "wall_s": time.monotonic() - t0,
        "killed": killed,
        "healing": sorted(set(HEAL_LINES.findall(text))),
        "rows": rows(out / "metrics.jsonl"),
        "log": str(log_path),
    }


def same_metrics(a: list[dict], b: list[dict]) -> bool:
    strip = [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in a]
    return len(a) == len(b) and strip == [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in b]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--kill-after", type=int, default=3, help="metrics rows logged before the kill")
    p.add_argument("--faults", nargs="*", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    base = ROOT / "runs" / "bench" / "healing"
    straight = {"fault": "none", **run_job(base / "none", args.iters, [], args.overrides)}
    results = [straight]
    for fault in args.faults:
        kills = [(args.kill_after, FAULTS[fault])]
        results.append({"fault": fault, **run_job(base / fault, args.iters, kills, args.overrides)})
    info = machine()
    lines = []
    iteration_s = sorted(r["time/iteration"] for r in straight["rows"])[len(straight["rows"]) // 2]
    for r in results[1:]:
        r["recover_s"] = r["killed"][0][2] if r["killed"] and len(r["killed"][0]) > 2 else None
        r["identical"] = r["rc"] == 0 and same_metrics(r["rows"], straight["rows"])
        did = "; ".join(h.rstrip(":") for h in r["healing"]) or "nothing (the fault was not noticed)"
        done = "finished" if r["rc"] == 0 else f"failed (exit {r['rc']})"
        lines.append([f"SIGKILL {r['fault']}", f"{did}; {done}", r["recover_s"], "yes" if r["identical"] else "no"])
    print(f"uninterrupted: {straight['wall_s']:.1f} s, {args.iters} iterations, median {iteration_s:.2f} s each")
    print(load_line(info))
    headers = ["fault injected", "what the run did", "kill to the killed iteration logged (s)", "metrics identical"]
    print(table(headers, lines, ".1f"))
    for r in results:
        del r["rows"]
    path = write_json("healing", {"machine": info, "iterations": args.iters, "runs": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
