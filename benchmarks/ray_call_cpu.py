"""What one Ray actor call costs in CPU on this machine, at both ends, and what an idle actor process burns.

    python benchmarks/ray_call_cpu.py [--actors 3] [--seconds 10] [--payload-kb 0]

On the embedded local Ray that jobs start (``rlhf_dist.orchestration.cluster.init_local``): N actors, first left
idle for S seconds, then called in rounds (one trivial call to each, all in flight, then a ``ray.get``) for S
seconds. Reads the actors' and the driver's process CPU around each window. With ``--payload-kb`` every call carries
an Arrow batch of about that size (as role calls do), so serialisation is in the cost. Prints a table, writes
``benchmarks/results/ray_call_cpu.json``. The per-call figures are what ``cpu/<role>_outside`` and ``cpu/driver``
in a job's metrics are made of, together with the idle cost per process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, table, write_json  # noqa: E402
from ray_cpu import process_cpu  # noqa: E402


def measure(actors: int, seconds: float, payload_kb: int) -> dict:
    import psutil
    import pyarrow as pa
    import ray

    sys.path.insert(0, str(ROOT))
    from rlhf_dist.orchestration.cluster import init_local

    init_local(actors + 1)

    @ray.remote(num_cpus=1)
    class Echo:
        def pid(self) -> int:
            return os.getpid()

        def call(self, batch=None) -> int:
            return 0 if batch is None else batch.num_rows

    try:
        handles = [Echo.remote() for _ in range(actors)]
        procs = [psutil.Process(pid) for pid in ray.get([h.pid.remote() for h in handles])]
        batch = pa.record_batch({"x": pa.array(range(payload_kb * 128), pa.int64())}) if payload_kb else None
        time.sleep(2.0)  # past the actors' start-up

        def window(calling: bool) -> dict:
            before, driver0, t0 = [process_cpu(p) for p in procs], time.process_time(), time.perf_counter()
            rounds = 0
            while time.perf_counter() - t0 < seconds:
                if calling:
                    ray.get([h.call.remote(batch) for h in handles])
                    rounds += 1
                else:
                    time.sleep(0.1)
            wall = time.perf_counter() - t0
            actor_cpu = sum(process_cpu(p) for p in procs) - sum(before)
            return {
                "wall_s": wall,
                "rounds": rounds,
                "actor_cpu_s": actor_cpu,
                "driver_cpu_s": time.process_time() - driver0,
            }

        idle, busy = window(False), window(True)
    finally:
        ray.shutdown()
    calls = busy["rounds"] * actors
    idle_per_actor_s = idle["actor_cpu_s"] / actors / idle["wall_s"]  # CPU-seconds per second per idle actor
    return {
        "actors": actors,
        "seconds": seconds,
        "payload_kb": payload_kb,
        "idle_actor_cpu_ms_per_s": 1000 * idle_per_actor_s,
        "idle_driver_cpu_ms_per_s": 1000 * idle["driver_cpu_s"] / idle["wall_s"],
        "calls": calls,
        "calls_per_s": calls / busy["wall_s"],
        # an actor's CPU while called, less what it burns idle over the same time
        "actor_cpu_ms_per_call": 1000 * (busy["actor_cpu_s"] - idle_per_actor_s * actors * busy["wall_s"]) / calls,
        "driver_cpu_ms_per_call": 1000 * busy["driver_cpu_s"] / calls,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--payload-kb", type=int, default=0, help="an Arrow batch of about this size in every call")
    p.add_argument("--name", default="ray_call_cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    before = machine()
    res = {"machine": before, **measure(a.actors, a.seconds, a.payload_kb)}
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{a.actors} actors, {a.seconds:.0f} s idle then {a.seconds:.0f} s of calls; payload {a.payload_kb} KB")
    print(f"{load_line(before)}, after: {res['load_avg_after']}\n")
    print(
        table(
            ["", "value"],
            [
                ["calls / s (all in flight per round)", res["calls_per_s"]],
                ["CPU ms per call, in the actor", res["actor_cpu_ms_per_call"]],
                ["CPU ms per call, in the driver", res["driver_cpu_ms_per_call"]],
                ["CPU ms / s of an idle actor process", res["idle_actor_cpu_ms_per_s"]],
                ["CPU ms / s of the idle driver", res["idle_driver_cpu_ms_per_s"]],
            ],
        )
    )
    print(f"\nresults: {write_json(a.name, res, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
