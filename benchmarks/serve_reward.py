"""Reward scoring through Ray Serve (``reward.serve``): pairs/s with 1 and 2 replicas, side by side in one run.

    python benchmarks/serve_reward.py                    # 6M-parameter reward model, 256 pairs per round, 5 rounds
    python benchmarks/serve_reward.py --size 30M --pairs 128 --rounds 3

Both applications are deployed at once (1 CPU and 1 torch thread per replica) and the rounds alternate between them,
so they see the same machine load. A round is what a reward actor does with its shard (``ServedReward.score``): the
pairs go out as requests of ``--batch-size`` rows, all at once, and the scores come back in order. The first round of
each is a warm-up. The in-process row is the same model scored in the driver (1 thread, one forward pass per
``--batch-size`` rows): the cost of going through Serve. The reward model is a Llama config built locally with
random weights (no downloads) under runs/bench_models/; prompts and responses are random token ids.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, table, write_json  # noqa: E402

SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, head_dim=32),
    "6M": dict(hidden=256, layers=6, heads=4, head_dim=64),
    "30M": dict(hidden=512, layers=7, heads=8, head_dim=64),
}


def make_batch(pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    import numpy as np

    from rlhf_dist.data import schema as S
    from rlhf_dist.data.batch import make_batch as arrow_batch

    rng = np.random.default_rng(seed)
    return arrow_batch(
        {
            S.PROMPT_IDS: [rng.integers(3, vocab, prompt_len).tolist() for _ in range(pairs)],
            S.RESPONSE_IDS: [rng.integers(3, vocab, response_len).tolist() for _ in range(pairs)],
        }
    )


def serve_config(model, args: argparse.Namespace, name: str, *scaling: str):
    """tiny_cpu.yaml with ``model`` as the reward model served under ``name``, 1 CPU a replica, ``scaling`` on top."""
    from rlhf_dist.config import load_config

    return load_config(
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        [
            f"model.policy={model}",
            f"model.reward={model}",
            "reward.serve.enabled=true",
            f"reward.serve.name={name}",
            "reward.serve.num_cpus=1",
            f"reward.serve.batch_size={args.batch_size}",
            *scaling,
        ],
    )


def start_ray() -> None:
    from rlhf_dist.orchestration.cluster import init_local

    init_local(num_cpus=4)


def bench(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    from rlhf_dist.engines.served_reward import RewardModelServer, ServedReward, import_serve
    from rlhf_dist.models.tiny import build_tiny
    from rlhf_dist.orchestration.reward_serve import served_reward

    model = build_tiny(ROOT / "runs" / "bench_models" / args.size, seed=0, **SIZES[args.size])
    probe = RewardModelServer(str(model), "float32", 0).model
    params, vocab = sum(p.numel() for p in probe.parameters()), probe.config.vocab_size
    batch = make_batch(args.pairs, args.prompt_len, args.response_len, vocab)
    info = machine()
    print(f"{load_line(info)}; reward model {args.size} ({params / 1e6:.1f}M parameters)", flush=True)

    start_ray()
    serve = import_serve()
    seconds: dict[str, list[float]] = {}
    try:
        cfgs = {n: serve_config(model, args, f"bench_{n}_replicas", f"reward.serve.replicas={n}") for n in (1, 2)}
        with served_reward(cfgs[1], reserved={}), served_reward(cfgs[2], reserved={}):
            clients = {
                f"{n} replica{'s' * (n > 1)}": ServedReward(c.reward.serve.name, args.batch_size, 600)
                for n, c in cfgs.items()
            }
            for r in range(args.rounds + 1):  # round 0 warms up
                for label, client in clients.items():
                    t0 = time.perf_counter()
                    client.score(batch)
                    if r:
                        seconds.setdefault(label, []).append(time.perf_counter() - t0)
                print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    torch.set_num_threads(1)
    local = RewardModelServer(str(model), "float32", 0, num_threads=1)
    for r in range(args.rounds + 1):
        t0 = time.perf_counter()
        for start in range(0, args.pairs, args.batch_size):
            local.score(batch.slice(start, args.batch_size))
        if r:
            seconds.setdefault("in-process, no Serve", []).append(time.perf_counter() - t0)

    end = machine()
    rows = []
    for label, times in seconds.items():
        med = statistics.median(times)
        rows.append({"setup": label, "median_s": med, "pairs_per_s": args.pairs / med, "rounds_s": times})
    one = next(r for r in rows if r["setup"] == "1 replica")
    for r in rows:
        r["vs_1_replica"] = r["pairs_per_s"] / one["pairs_per_s"]
    print(
        f"\n{args.pairs} pairs x ({args.prompt_len} prompt + {args.response_len} response tokens), requests of "
        f"{args.batch_size}, median of {args.rounds} rounds; {load_line(end)} at the end\n"
    )
    print(
        table(
            ["setup", "s per round", "pairs/s", "x 1 replica"],
            [[r["setup"], r["median_s"], r["pairs_per_s"], r["vs_1_replica"]] for r in rows],
        )
    )
    payload = {
        "machine": info,
        "machine_at_end": end,
        "model": {"size": args.size, "parameters": params},
        "load": {k: getattr(args, k) for k in ("pairs", "prompt_len", "response_len", "batch_size", "rounds")},
        "rows": rows,
    }
    path = write_json(args.name, payload)
    print(f"\nwritten: {path}")
    return payload


def autoscale(args: argparse.Namespace) -> dict:
    """reward.serve with max_replicas: one replica at first, rounds of scoring back to back for ``--autoscale``
    seconds; per round its pairs/s and the replicas Serve has running. Serve's own autoscaler decides (its default
    delays: it scales up after the load has lasted ``upscale_delay_s``, 30 s)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from transformers import AutoConfig

    from rlhf_dist.engines.served_reward import ServedReward, import_serve
    from rlhf_dist.models.tiny import build_tiny
    from rlhf_dist.orchestration.reward_serve import DEPLOYMENT, served_reward

    model = build_tiny(ROOT / "runs" / "bench_models" / args.size, seed=0, **SIZES[args.size])
    vocab = AutoConfig.from_pretrained(model).vocab_size
    cfg = serve_config(
        model,
        args,
        "bench_autoscale",
        "reward.serve.replicas=1",
        "reward.serve.max_replicas=2",
        "reward.serve.target_ongoing_requests=1",
    )
    info = machine()
    print(f"{load_line(info)}; autoscaling 1..2 replicas, target 1 request in flight each", flush=True)
    start_ray()
    serve = import_serve()
    rounds = []
    try:
        with served_reward(cfg, reserved={}):
            client = ServedReward(cfg.reward.serve.name, args.batch_size, 600)
            batch = make_batch(args.pairs, args.prompt_len, args.response_len, vocab)
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < args.autoscale:
                t0 = time.perf_counter()
                client.score(batch)
                took = time.perf_counter() - t0
                app = serve.status().applications[cfg.reward.serve.name]
                running = app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)
                rounds.append(
                    {"t_s": time.perf_counter() - t_start, "pairs_per_s": args.pairs / took, "running": running}
                )
                print(
                    f"  t={rounds[-1]['t_s']:5.1f} s  {rounds[-1]['pairs_per_s']:6.1f} pairs/s  {running} running",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    first_two = next((r["t_s"] for r in rounds if r["running"] >= 2), None)
    one = [r["pairs_per_s"] for r in rounds if r["running"] == 1][1:]  # the first round warms up
    two = [r["pairs_per_s"] for r in rounds if r["running"] >= 2]
    summary = {
        "second_replica_running_at_s": first_two,
        "pairs_per_s_one_replica": statistics.median(one) if one else None,
        "pairs_per_s_two_replicas": statistics.median(two) if two else None,
    }
    print(table(["measure", "value"], [[k, v] for k, v in summary.items()]))
    path = write_json(args.name, {"machine": info, "model": args.size, "rounds": rounds, **summary})
    print(f"\nwritten: {path}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="6M", help="reward model size (default 6M)")
    p.add_argument("--pairs", type=int, default=256, help="(prompt, response) pairs per round (default 256)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="rows per request (reward.serve.batch_size)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per setup, after one warm-up")
    p.add_argument("--name", default="serve_reward", help="benchmarks/results/NAME.json")
    p.add_argument("--autoscale", type=float, metavar="S", help="instead: S seconds of load on an autoscaling app")
    args = p.parse_args()
    autoscale(args) if args.autoscale else bench(args)


if __name__ == "__main__":
    main()
