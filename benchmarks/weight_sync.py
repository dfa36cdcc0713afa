"""Weight sync, learner -> rollout actors: bytes, seconds and GB/s per transport, model size and rollout count.

    python benchmarks/weight_sync.py                  # CPU: object store; tiny .. ~0.5B parameters, 1 and 2 rollouts
    python benchmarks/weight_sync.py --sizes tiny,30M --repeats 5
    python benchmarks/weight_sync.py --gpu --transports object_store,nccl,cuda_ipc   # on a GPU machine (vLLM rollouts)

The full path is timed, as the PPO driver runs it (``rlhf_dist.orchestration.weight_push``): the learner gathers its
full weights (a collective under ZeRO-3), packs them into buckets and drives the rollout engines through the
transport; every rollout actor loads them into its engine and reports the new version. Each actor's own seconds come
from its compute ledger, so the table also splits a push into export (the learner's push less the rollout's load
inside it: gather + pack), load, and the rest (object transfer, scheduling). Models are Llama configs of increasing
size built locally with random weights (no downloads) under runs/bench_models/. A size whose estimated memory does
not fit in what the machine has free is skipped and listed.

GB/s is the payload over the push's wall time. The payload is the bytes the push reports it shipped: the learner's
buckets in the learner's dtype (float32 under train.engine=torch, whatever model.dtype says). With N rollout actors on
one node the object store holds the payload once and every actor reads it from shared memory, so the bytes delivered
are N x payload.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, table, write_json  # noqa: E402

# label -> build_tiny arguments. Parameters ~ 16 * hidden^2 * layers (+ a few-hundred-token embedding).
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, head_dim=32),
    "6M": dict(hidden=256, layers=6, heads=4, head_dim=64),
    "30M": dict(hidden=512, layers=7, heads=8, head_dim=64),
    "120M": dict(hidden=768, layers=13, heads=12, head_dim=64),
    "250M": dict(hidden=1024, layers=15, heads=16, head_dim=64),
    "500M": dict(hidden=1024, layers=30, heads=16, head_dim=64),
}
MODELS = ROOT / "runs" / "bench_models"


def build_model(label: str) -> Path:
    from rlhf_dist.models.tiny import build_tiny

    return build_tiny(MODELS / label, seed=0, **SIZES[label])


def estimate_params(label: str, vocab: int = 400) -> int:
    a = SIZES[label]
    h, inner = a["hidden"], a["heads"] * a["head_dim"]
    per_layer = 4 * h * inner + 3 * h * 4 * h + 2 * h
    return a["layers"] * per_layer + vocab * h + h


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def launch(cfg, n_rollout: int):
    """Only the two roles weight sync needs, placed as ``launch_roles`` places them."""
    import ray

    from rlhf_dist.orchestration.cluster import worker_env
    from rlhf_dist.orchestration.placement import bundles_by_owner, plan
    from rlhf_dist.orchestration.role_group import Bundles, RoleGroup, reserve
    from rlhf_dist.workers.policy import PolicyWorker
    from rlhf_dist.workers.rollout import RolloutWorker

    plans = {r: p for r, p in plan(cfg).items() if r in ("policy", "rollout")}
    pgs = {
        owner: reserve(f"bench_{owner}", n, b["CPU"], b.get("GPU", 0.0), plans[owner].placement.upper(), 600)
        for owner, (n, b) in bundles_by_owner(plans).items()
    }
    groups = {}
    for role, cls in (("policy", PolicyWorker), ("rollout", RolloutWorker)):
        p = plans[role]
        owner_n = plans[p.bundle_owner].num_actors
        bundles = Bundles(pgs[p.bundle_owner], [i % owner_n for i in range(p.num_actors)], p.num_cpus, p.num_gpus)
        args = (
            (lambda rank, n=p.num_actors: ((cfg, rank, n), {}))
            if role == "policy"
            else (lambda rank: ((cfg, rank), {}))
        )
        groups[role] = RoleGroup(role, cls, bundles, args, 600, env_vars=worker_env())
    addr, port = groups["policy"].call_rank(0, "rendezvous_address").get()[0]
    groups["policy"].call("init_group", addr, port).get()
    groups["rollout"].call("get_version").get()  # started

    def stop():
        for g in groups.values():
            for a in g.actors:
                ray.kill(a)
        for pg in pgs.values():
            ray.util.remove_placement_group(pg)

    return groups, stop


def measure(cfg, groups, n: int, repeats: int) -> dict:
    """``repeats`` timed pushes to the first ``n`` rollout actors, after one untimed push."""
    from rlhf_dist.orchestration.role_group import collect_compute_stats
    from rlhf_dist.orchestration.weight_push import WeightPush

    rollout = copy.copy(groups["rollout"])
    rollout.actors = groups["rollout"].actors[:n]
    sync = WeightPush(cfg, groups["policy"], rollout)
    sub = {"policy": groups["policy"], "rollout": rollout}
    shipped = sync.push(1)["bytes"]  # what rank 0 sent: its buckets, in the learner's dtype
    collect_compute_stats(sub)
    walls, exports, loads, peaks = [], [], [], {"policy": 0.0, "rollout": 0.0}
    for version in range(2, repeats + 2):
        t0 = time.perf_counter()
        sync.push(version)
        walls.append(time.perf_counter() - t0)
        stats = collect_compute_stats(sub)  # this push's seconds and peak memory; resets the ledgers
        loads.append(max(sum(s["seconds"].values()) for s in stats["rollout"]))
        # rank 0's push drives the rollout's load from inside it: its own share is the push less that wait
        exports.append(sum(stats["policy"][0]["seconds"].values()) - loads[-1])
        for role in peaks:
            peaks[role] = max(peaks[role], *(s["peak_rss_mb"] for s in stats[role]))
    k = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]  # the median push
    return {
        "transport": sync.name,
        "rollout_actors": n,
        "seconds": walls[k],
        "seconds_all": walls,
        **payload(shipped, n, walls[k]),
        "export_s": exports[k],
        "load_s": loads[k],
        "rest_s": walls[k] - exports[k] - loads[k],  # Ray calls, the object transfer
        "policy_peak_mb": peaks["policy"],
        "rollout_peak_mb": peaks["rollout"],
    }


def payload(shipped_bytes: float, rollout_actors: int, seconds: float) -> dict:
    """Bytes per push as the transport shipped them (not params x model.dtype: the learner may hold float32)."""
    nbytes = int(shipped_bytes)
    return {"payload_bytes": nbytes, "delivered_bytes": nbytes * rollout_actors, "gb_per_s": nbytes / seconds / 1e9}


def config_overrides(
    model: Path | str, transport: str, actor_counts: list[int], bucket_mb: int, gpu: bool
) -> list[str]:
    """The overrides of configs/tiny_cpu.yaml for one transport (tests check that they validate and plan)."""
    overrides = [
        f"model.policy={model}",
        "train.engine=torch",
        f"roles.rollout.num_actors={max(actor_counts)}",
        f"sync.transport={transport}",
        f"sync.bucket_mb={bucket_mb}",
        f"ray.num_cpus={4 + max(actor_counts)}",
    ]  # the config check counts every role
    if gpu:  # UNTESTED here (no GPU): NCCL needs a GPU per rollout actor; the others share the learner's GPU
        overrides += [
            "generation.engine=vllm",
            "model.dtype=bfloat16",
            "roles.policy.num_gpus=1",
            f"generation.gpu_memory_utilization={0.6 / max(actor_counts):.2f}",
        ]
        overrides += ["roles.rollout.num_gpus=1"] if transport == "nccl" else ["roles.rollout.colocate_with=policy"]
    return overrides


def run_size(
    label: str, transports: list[str], actor_counts: list[int], repeats: int, gpu: bool, bucket_mb: int
) -> list[dict]:
    from rlhf_dist.config import load_config

    path = build_model(label)
    n_params = sum(t.numel() for t in _safetensors_shapes(path))
    rows = []
    for transport in transports:
        overrides = config_overrides(path, transport, actor_counts, bucket_mb, gpu)
        cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), overrides)
        groups, stop = launch(cfg, max(actor_counts))
        try:
            for n in actor_counts:
                r = measure(cfg, groups, n, repeats)
                r.update(model=label, params=n_params)
                rows.append(r)
                print(_row_line(r), flush=True)
        finally:
            stop()
    return rows


def _safetensors_shapes(path: Path):
    import torch
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            yield torch.empty(f.get_slice(name).get_shape(), device="meta")


def _row_line(r: dict) -> str:
    return (
        f"  {r['model']:>5} {r['params'] / 1e6:8.1f}M  {r['transport']:<12} x{r['rollout_actors']}  "
        f"{r['payload_bytes'] / 2**20:9.1f} MiB  {r['seconds']:8.3f} s  {r['gb_per_s']:6.2f} GB/s  "
        f"(export {r['export_s']:.3f} s, load {r['load_s']:.3f} s, rest {r['rest_s']:.3f} s)"
    )


def render(res: dict) -> str:
    rows = [
        [
            r["model"],
            f"{r['params'] / 1e6:.1f}M",
            r["transport"],
            r["rollout_actors"],
            f"{r['payload_bytes'] / 2**20:.1f}",
            r["seconds"],
            r["gb_per_s"],
            r["export_s"],
            r["load_s"],
            r["rest_s"],
            f"{r['policy_peak_mb']:.0f}",
            f"{r['rollout_peak_mb']:.0f}",
        ]
        for r in res["rows"]
    ]
    out = [
        f"weight sync, model.dtype {res['dtype']} (MiB as shipped, in the learner's dtype), bucket "
        f"{res['bucket_mb']} MiB, median of {res['repeats']} pushes; {load_line(res['machine'])}",
        table(
            [
                "model",
                "params",
                "transport",
                "rollouts",
                "MiB",
                "s / push",
                "GB/s",
                "export s",
                "load s",
                "rest s",
                "learner peak MiB",
                "rollout peak MiB",
            ],
            rows,
        ),
    ]
    out += [f"skipped {s['model']}: {s['why']}" for s in res["skipped"]]
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {list(SIZES)}")
    p.add_argument(
        "--transports", default=None, help="default: object_store on CPU; object_store,nccl,cuda_ipc with --gpu"
    )
    p.add_argument("--rollouts", default="1,2", help="rollout actor counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=3, help="timed pushes per cell (default 3; the median is reported)")
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--gpu", action="store_true", help="one GPU per actor, vLLM rollouts (needs a GPU machine)")
    p.add_argument("--name", default="weight_sync")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from rlhf_dist.orchestration.cluster import init_local

    if a.gpu and not torch.cuda.is_available():
        p.error("--gpu: this machine has no CUDA device")
    transports = (a.transports or ("object_store,nccl,cuda_ipc" if a.gpu else "object_store")).split(",")
    counts = [int(x) for x in a.rollouts.split(",")]
    res = {
        "machine": machine(),
        "dtype": "bfloat16" if a.gpu else "float32",
        "bucket_mb": a.bucket_mb,
        "repeats": a.repeats,
        "rows": [],
        "skipped": [],
        "not_measured": [],
    }
    if not a.gpu:
        res["not_measured"].append("nccl, cuda_ipc: need GPUs (vLLM rollout engines); run with --gpu on a GPU machine")
    elif "nccl" in transports and torch.cuda.device_count() < 1 + max(counts):
        transports.remove("nccl")
        res["not_measured"].append(
            f"nccl: needs {1 + max(counts)} GPUs (the learner's and one per rollout actor), "
            f"this machine has {torch.cuda.device_count()}"
        )
    init_local(num_cpus=max(4, 1 + max(counts)))
    try:
        for label in a.sizes.split(","):
            # learner: model + packed buckets; object store: one payload; each rollout: model; ~1.5 GiB of processes
            need = estimate_params(label) * 4 * (3 + max(counts)) + int(1.5 * 2**30)
            free = mem_available()
            if need > 0.85 * free:
                res["skipped"].append(
                    {"model": label, "why": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"}
                )
                print(f"skipping {label}: {res['skipped'][-1]['why']}", flush=True)
                continue
            print(f"{label}: building/loading ...", flush=True)
            res["rows"] += run_size(label, transports, counts, a.repeats, a.gpu, a.bucket_mb)
            write_json(a.name, res)  # partial results survive a later size that runs out of memory
    finally:
        ray.shutdown()
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json(a.name, res)
    print(render(res))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
