"""One prepared command for a one-GPU machine without internet: the GPU paths that the CPU tests cannot reach.

    make gpu-check                                   # on the device, after `bash ../shared/tools/device-pack.sh` here
    make gpu-check ARGS=--dry-run                    # CI: the same code with CPU / gloo / tiny-model substitutes
    python benchmarks/gpu_check.py --only a,c --out /tmp/gc

 a. DeepSpeed ZeRO-2 and ZeRO-3 bf16 training steps through rlhf_dist.engines.training: loss finite, weights moved.
 b. CUDA-IPC weight handover between two processes (pack_buckets + reduce_tensor -> rebuild_cuda_tensor), bitwise.
 c. NCCL broadcast of buckets (layout first, then bytes) from a learner process to a receiver process on the same
    GPU (NCCL over sockets), bitwise.
 d. 3 PPO iterations of a random ~0.5B Qwen2-shaped model, every role on the one GPU (rlhf_dist.trainers.ppo.run).

Every check runs in a process of its own, so a crash, a CUDA error or a hang costs that check only. Writes
<out>/gpu_check.json and .md (the dry run: gpu_check_dry_run.*), each check's output and traceback in
<out>/<name>_logs/<check>.log, and copies them to $OUT when it is set. Exit code 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, ROOT, machine  # noqa: E402

GIB = 2**30
# id -> (letter for --only, title, timeout s on the GPU, timeout s in the dry run). On the GPU the timeouts add up
# to 8 minutes; a_zero2's is the longest because it also builds the 0.5B model and pays DeepSpeed's first-use costs.
CHECKS = {
    "a_zero2": ("a", "DeepSpeed ZeRO-2 bf16 step", 150, 150),
    "a_zero3": ("a", "DeepSpeed ZeRO-3 bf16 step", 60, 90),
    "b_cuda_ipc": ("b", "CUDA IPC weight handover", 45, 60),
    "c_nccl": ("c", "NCCL broadcast, same GPU", 45, 60),
    "d_ppo": ("d", "PPO, all roles on one GPU", 180, 150),
}
# The ~0.5B Qwen2 shape (Qwen2.5-0.5B). The vocabulary stays at Qwen's 151936 rather than the tiny tokenizer's 341:
# the 136M-parameter embedding / LM head and its [tokens, 151936] logits are a large share of a real 0.5B model's
# memory and log-prob compute. Sampled ids above 340 decode to nothing, so answers run to max_new_tokens: a fixed
# length, which suits timing.
QWEN_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


@dataclass
class Sizes:
    """What the checks train and move: the GPU sizes, or small ones for the dry run on 2 CPU cores."""

    batch: int  # (a) rows x tokens per training step
    seq: int
    steps: int  # (a) the first pays for warm-up; the median of the others is reported
    rows: int  # (b, c) every "layer" is a bf16 [rows, cols] matrix and a [cols] vector
    cols: int
    ipc_layers: int
    ipc_bucket: int
    ipc_rounds: int
    bc_layers: int
    bc_bucket: int
    ppo: tuple[str, ...]  # (d) config overrides on top of the shared ones


GPU_SIZES = Sizes(
    batch=8,
    seq=256,
    steps=4,
    rows=4096,
    cols=4096,
    ipc_layers=32,
    ipc_bucket=256 << 20,  # 1 GiB
    ipc_rounds=3,
    bc_layers=8,
    bc_bucket=64 << 20,  # 256 MiB
    ppo=("roles.policy.num_gpus=1", "generation.max_new_tokens=64", "train.iterations=3"),
)
DRY_SIZES = Sizes(
    batch=2,
    seq=32,
    steps=2,
    rows=128,
    cols=256,
    ipc_layers=16,
    ipc_bucket=256 << 10,
    ipc_rounds=2,
    bc_layers=8,
    bc_bucket=128 << 10,
    ppo=("roles.policy.num_gpus=0", "generation.max_new_tokens=16", "train.iterations=2"),
)


class Context:
    def __init__(self, dry_run: bool, work: Path):
        self.dry_run, self.work = dry_run, work
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES

    @property
    def device(self):
        import torch

        if self.dry_run:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; on a machine without a GPU run with --dry-run")
        return torch.device("cuda", 0)

    def model_dir(self) -> Path:
        """The tiny model (dry run) or the random ~0.5B Qwen2, built once under the work folder."""
        if self.dry_run:
            from rlhf_dist.models.tiny import build_tiny

            return build_tiny(self.work / "tiny", seed=0)
        return build_random_qwen(self.work / "qwen2-0.5b-random", self.work / "tiny", self.device)


def build_random_qwen(path: Path, tiny_dir: Path, device, shape: dict = QWEN_05B) -> Path:
    """A randomly initialised Qwen2 saved in HF format (bf16) with the tiny tokenizer: no download needed."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rlhf_dist.engines.training.base import atomic_write_dir
    from rlhf_dist.models.tiny import build_tiny

    if (path / "model.safetensors").is_file():
        return path
    tiny = build_tiny(tiny_dir, seed=0)  # its tokenizer files are the portable ones
    ids = json.loads((tiny / "config.json").read_text())
    ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2Config(**shape, **ids)
    torch.manual_seed(0)
    with torch.device(device):  # HF's weight init of 0.5B parameters: seconds on a GPU, ~20 s on 2 CPU cores
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)

    def write(tmp: Path) -> None:
        model.to("cpu").save_pretrained(tmp)
        for f in tiny.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp / f.name)

    return atomic_write_dir(path, write)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- a. DeepSpeed ZeRO-2 / ZeRO-3 training step ---------------------------------------------------------------------
def check_train_step(ctx: Context, zero_stage: int) -> dict:
    import torch

    from rlhf_dist.comm.process_group import init_process_group
    from rlhf_dist.engines.training import TrainOptions, make_train_engine
    from rlhf_dist.models.load import load_causal_lm

    s, device = ctx.sizes, ctx.device
    init_process_group(0, 1)
    model = load_causal_lm(ctx.model_dir(), dtype="bfloat16")
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    # lr 1e-3: one Adam step moves a weight by about lr, which must exceed bf16's resolution to show up at all
    engine = make_train_engine(
        "deepspeed", model, TrainOptions(lr=1e-3, zero_stage=zero_stage, dtype="bfloat16", micro_batch_size=s.batch)
    )
    init_s = time.perf_counter() - t0  # includes any first-use build of DeepSpeed's GPU optimizer (FusedAdam: nvcc)
    before = dict(engine.named_full_parameters(device=device))
    # one batch of ids the tokenizer knows, repeated: the loss should fall from step to step (reported, not required)
    ids = torch.randint(4, 300, (s.batch, s.seq), generator=torch.Generator().manual_seed(0)).to(engine.device)
    losses, times = [], []
    for _ in range(s.steps):
        _sync(device)
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    changed = total = 0
    for name, p in engine.named_full_parameters(device=device):
        changed += int((p != before[name]).sum())
        total += p.numel()
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"ZeRO-{zero_stage}: loss not finite: {losses}")
    if changed == 0:
        raise RuntimeError(f"ZeRO-{zero_stage}: no weight changed after {s.steps} steps")
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "zero_stage": zero_stage,
        "params": n_params,
        "batch": [s.batch, s.seq],
        "losses": losses,
        "changed_frac": changed / total,
        "init_s": init_s,
        "first_step_s": times[0],
        "step_s": step_s,
        "tokens_per_s": s.batch * s.seq / step_s,
        "peak_mb": _peak_mb(device),
    }


# ---- shared by b and c: named weights both sides can make from one seed ---------------------------------------------
def weight_shapes(layers: int, rows: int, cols: int):
    import torch

    shapes = {}
    for i in range(layers):  # a matrix and a vector per layer, so bucket offsets are not all multiples of a row
        shapes[f"layers.{i}.weight"] = ((rows, cols), torch.bfloat16)
        shapes[f"layers.{i}.bias"] = ((cols,), torch.bfloat16)
    return shapes


def make_weights(shapes: dict, device, seed: int = 0) -> list:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        (name, torch.randn(shape, generator=gen, device=device).to(dtype)) for name, (shape, dtype) in shapes.items()
    ]


def _nbytes(shapes: dict) -> int:
    return sum(math.prod(shape) * 2 for shape, _ in shapes.values())  # bf16


# ---- b. CUDA IPC handover --------------------------------------------------------------------------------------------
def share_buckets(named: list, bucket_bytes: int, keep_alive: list) -> list:
    """Per bucket ``(reduce_tensor(flat), entries)``: a CUDA IPC handle on the GPU; on a CPU (dry run) the same call
    moves the storage into shared memory and passes a file descriptor, so the process and queue plumbing is alike."""
    from torch.multiprocessing.reductions import reduce_tensor

    from rlhf_dist.engines.weight_sync.buckets import pack_buckets

    out = []
    for bucket in pack_buckets(named, bucket_bytes):
        keep_alive.append(bucket.flat)  # the receiver maps this memory: it must live until the receiver has copied
        out.append((reduce_tensor(bucket.flat), [(e.name, list(e.shape), e.offset, e.numel) for e in bucket.entries]))
    return out


def _ipc_receiver(device_name: str, shapes: dict, inbox, outbox) -> None:
    """The rollout side: rebuild each bucket from its handle, copy it into its own weights, compare bitwise."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from rlhf_dist.engines.weight_sync.buckets import Bucket, BucketEntry, unpack_bucket

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    expected = dict(make_weights(shapes, device))
    mine = {name: torch.empty_like(t) for name, t in expected.items()}
    outbox.put("ready")
    while (handles := inbox.get()) is not None:
        t0, received = time.perf_counter(), []
        for (rebuild, args), entries in handles:
            if rebuild is rebuild_cuda_tensor:  # as a vLLM worker does: its own index for the device
                args = (*args[:6], device.index, *args[7:])
            received.append(rebuild(*args))
            bucket = Bucket(received[-1], [BucketEntry(n, tuple(shape), off, n_) for n, shape, off, n_ in entries])
            for name, view in unpack_bucket(bucket):
                mine[name].copy_(view)
        _sync(device)
        copy_s = time.perf_counter() - t0
        del received, bucket  # only after the copies ran: frees the learner's buffers (IPC counts references)
        equal = all(torch.equal(mine[n], expected[n]) for n in expected)
        outbox.put({"copy_s": copy_s, "check_s": time.perf_counter() - t0 - copy_s, "equal": equal})


def _get(queue, procs: list, timeout: float):
    """queue.get that fails at once when one of ``procs`` died instead of waiting out the timeout."""
    import queue as q

    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=1.0)
        except q.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"{dead[0].name} died with exit code {dead[0].exitcode} (its traceback is above)"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {[p.name for p in procs]} in {timeout} s") from None


def check_ipc(ctx: Context) -> dict:
    import torch.multiprocessing as mp

    s, device = ctx.sizes, ctx.device
    shapes = weight_shapes(s.ipc_layers, s.rows, s.cols)
    named = make_weights(shapes, device)
    spawn = mp.get_context("spawn")
    inbox, outbox = spawn.Queue(), spawn.Queue()
    receiver = spawn.Process(
        target=_ipc_receiver, args=(str(device), shapes, inbox, outbox), name="receiver", daemon=True
    )
    receiver.start()
    try:
        if _get(outbox, [receiver], 60) != "ready":
            raise RuntimeError("receiver did not start")
        rounds = []
        for _ in range(s.ipc_rounds):  # fresh buffers and handles every round, as every weight push makes
            keep_alive: list = []
            t0 = time.perf_counter()
            handles = share_buckets(named, s.ipc_bucket, keep_alive)
            _sync(device)
            pack_s = time.perf_counter() - t0
            inbox.put(handles)
            reply = _get(outbox, [receiver], 60)
            handover_s = time.perf_counter() - t0 - reply["check_s"]  # the receiver's comparison is not handover
            rounds.append({"pack_s": pack_s, "handover_s": handover_s, "buckets": len(handles), **reply})
            del handles, keep_alive
        inbox.put(None)
        receiver.join(timeout=30)
    finally:
        if receiver.is_alive():
            receiver.kill()
    if not all(r["equal"] for r in rounds):
        raise RuntimeError(f"received weights differ from the sent ones: {rounds}")
    nbytes = _nbytes(shapes)
    copy_s = statistics.median(r["copy_s"] for r in rounds)
    handover_s = statistics.median(r["handover_s"] for r in rounds)
    return {
        "bytes": nbytes,
        "buckets": rounds[0]["buckets"],
        "rounds": rounds,
        "equal": True,
        "copy_s": copy_s,
        "handover_s": handover_s,
        "receive_gb_s": nbytes / copy_s / 1e9,
        "end_to_end_gb_s": nbytes / handover_s / 1e9,
    }


# ---- c. NCCL broadcast between two processes on one GPU -------------------------------------------------------------
def _broadcast_rank(rank: int, port: int, device_name: str, shapes: dict, bucket_bytes: int, outbox) -> None:
    """Rank 0 (the learner) packs the buckets and broadcasts their layout, then their bytes; rank 1 (the receiver)
    allocates each bucket from the layout and receives into it."""
    # NCCL refuses two ranks on one GPU of one host; distinct host ids make it treat them as two hosts over sockets.
    os.environ.update(NCCL_HOSTID=f"gpu-check-{rank}", NCCL_SOCKET_IFNAME="lo", NCCL_IB_DISABLE="1")
    os.environ.setdefault("NCCL_DEBUG", "INFO")  # to the check's log: the transport NCCL chose, or why it refused
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from rlhf_dist.engines.weight_sync.buckets import Bucket, BucketEntry, pack_buckets, unpack_bucket

    try:
        device = torch.device(device_name)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=60),
            device_id=device if device.type == "cuda" else None,
        )
        buckets = list(pack_buckets(make_weights(shapes, device), bucket_bytes)) if rank == 0 else []
        layout = [[(e.name, e.shape, e.offset, e.numel) for e in b.entries] for b in buckets]
        box = [layout]
        dist.broadcast_object_list(box, src=0)  # also sets the communicator up, so it is not timed below
        if rank == 1:
            buckets = [
                Bucket(
                    torch.empty(sum(e[3] for e in entries), dtype=torch.bfloat16, device=device),
                    [BucketEntry(*e) for e in entries],
                )
                for entries in box[0]
            ]
        _sync(device)
        t0 = time.perf_counter()
        for b in buckets:
            dist.broadcast(b.flat, src=0)
        _sync(device)
        seconds = time.perf_counter() - t0
        equal = True
        if rank == 1:
            expected = dict(make_weights(shapes, device))
            got = dict(named for b in buckets for named in unpack_bucket(b))
            equal = got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
        outbox.put({"rank": rank, "seconds": seconds, "equal": equal, "backend": backend, "buckets": len(buckets)})
        dist.destroy_process_group()
    except BaseException as e:
        outbox.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise


def check_broadcast(ctx: Context) -> dict:
    import torch.multiprocessing as mp

    from rlhf_dist.comm.process_group import find_free_port

    s, device = ctx.sizes, ctx.device
    shapes = weight_shapes(s.bc_layers, s.rows, s.cols)
    spawn = mp.get_context("spawn")
    outbox = spawn.Queue()
    port = find_free_port()
    ranks = [
        spawn.Process(
            target=_broadcast_rank,
            args=(r, port, str(device), shapes, s.bc_bucket, outbox),
            name=f"rank {r}",
            daemon=True,
        )
        for r in range(2)
    ]
    for p in ranks:
        p.start()
    try:
        results = {}
        for _ in ranks:
            r = _get(outbox, ranks, 120)
            if "error" in r:
                raise RuntimeError(f"rank {r['rank']}: {r['error']}")
            results[r["rank"]] = r
        for p in ranks:
            p.join(timeout=30)
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
    if not results[1]["equal"]:
        raise RuntimeError("the receiver's buckets differ from the learner's weights")
    nbytes, seconds = _nbytes(shapes), results[1]["seconds"]  # the receiver's clock: data has arrived
    return {
        "backend": results[1]["backend"],
        "bytes": nbytes,
        "buckets": results[1]["buckets"],
        "equal": True,
        "seconds": seconds,
        "gb_s": nbytes / seconds / 1e9,
        "note": "NCCL over sockets on loopback (two ranks on one GPU): correctness, not representative speed",
    }


# ---- d. PPO with every role on the one GPU --------------------------------------------------------------------------
def check_ppo(ctx: Context) -> dict:
    from rlhf_dist.config import load_config
    from rlhf_dist.trainers import ppo

    model = ctx.model_dir()
    out = ctx.work / "ppo"
    overrides = [
        f"model.policy={model}",
        "model.dtype=bfloat16",
        "model.build_tiny_if_missing=false",
        f"output_dir={out}",
        *(f"roles.{r}.colocate_with=policy" for r in ("rollout", "reward", "reference", "critic")),
        "generation.engine=hf",  # vLLM does not travel to the device
        "train.engine=deepspeed",
        "train.zero_stage=2",
        "train.prompts_per_iteration=16",
        "train.policy_lr=1e-5",
        "train.critic_lr=1e-5",
        "sync.max_logprob_mismatch=1e9",  # bf16 engines disagree: report the gap instead of failing on it
        "logging.progress_bar=false",
        "logging.plot=false",
        "checkpoint.save_final=false",
        "checkpoint.overwrite=true",  # every check run replaces the last one
        *ctx.sizes.ppo,
    ]
    summary = ppo.run(load_config(ROOT / "configs/tiny_cpu.yaml", overrides))
    rows = [json.loads(line) for line in Path(summary["metrics_path"]).read_text().splitlines() if line.strip()]
    warm = rows[1:] or rows  # the first iteration pays for CUDA / allocator warm-up
    # driver phases (time/*); with the object-store push queued behind training there is no time/weight_sync, and
    # the push's own compute is compute/policy/push_weights
    keys = [k for k in rows[0] if k.startswith("time/") and k not in ("time/iteration", "time/wall")]
    keys += [k for k in ("compute/policy/push_weights",) if k in rows[0] and "time/weight_sync" not in rows[0]]
    phases = {k: [r[k] for r in rows] for k in keys}
    memory = {k: max(r.get(k, 0.0) for r in rows) for k in rows[-1] if k.startswith("memory/")}
    gpu = any(k.endswith("_gpu_peak_mb") for k in memory)  # else resident memory (CPU)
    suffix = "_gpu_peak_mb" if gpu else "_peak_mb"
    by_role = {k.removeprefix("memory/").removesuffix(suffix): v for k, v in memory.items() if k.endswith(suffix)}
    mismatch = [r["logprob_mismatch"] for r in rows]
    return {
        "iterations": len(rows),
        "startup_s": summary["startup_s"],
        "model": str(model),
        "overrides": overrides,
        "seconds_per_iteration": statistics.mean(r["time/iteration"] for r in warm),
        "phase_s": {k: statistics.mean(v[len(v) - len(warm) :]) for k, v in phases.items()},
        "phase_s_per_iteration": phases,
        "memory_mb": by_role,
        "memory_kind": "gpu_peak" if gpu else "rss_peak",
        "memory_all_mb": memory,
        "logprob_mismatch": mismatch,
        "logprob_mismatch_max": max(mismatch),
        "response_len": statistics.mean(r["response_len"] for r in rows),
    }


# ---- one line per check for the table -------------------------------------------------------------------------------
def key_numbers(cid: str, n: dict) -> str:
    if cid.startswith("a_"):
        return (
            f"loss {n['losses'][0]:.3f} -> {n['losses'][-1]:.3f}; {n['changed_frac']:.0%} of weights changed; "
            f"step {n['step_s']:.3f} s ({n['tokens_per_s']:.0f} tok/s), first {n['first_step_s']:.2f} s; "
            f"engine init {n['init_s']:.1f} s; peak {n['peak_mb']:.0f} MB"
        )
    if cid == "b_cuda_ipc":
        return (
            f"{_size(n['bytes'])} bf16 in {n['buckets']} buckets, bitwise equal; receive "
            f"{n['receive_gb_s']:.3g} GB/s, end-to-end {n['end_to_end_gb_s']:.3g} GB/s"
        )
    if cid == "c_nccl":
        return (
            f"{n['backend']}: {_size(n['bytes'])} in {n['buckets']} buckets, bitwise equal; "
            f"{n['gb_s']:.3g} GB/s (sockets, not representative)"
        )
    if cid == "d_ppo":
        phases = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in n["phase_s"].items())
        memory = ", ".join(f"{r} {v:.0f}" for r, v in n["memory_mb"].items())
        return (
            f"{n['iterations']} it, {n['seconds_per_iteration']:.2f} s/it ({phases}); "
            f"{n['memory_kind']} MB: {memory}; log-prob gap max {n['logprob_mismatch_max']:.4f}"
        )
    return ""


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.3g} MiB"


# ---- the runner: one child process per check ----------------------------------------------------------------------
def run_child(cid: str, ctx: Context, result_path: Path) -> int:
    """Inside the check's own process: run it, write its numbers (or its one-line error) as JSON."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # on timeout: unwind, so finally blocks stop Ray
    fn = {
        "a_zero2": lambda c: check_train_step(c, 2),
        "a_zero3": lambda c: check_train_step(c, 3),
        "b_cuda_ipc": check_ipc,
        "c_nccl": check_broadcast,
        "d_ppo": check_ppo,
    }[cid]
    try:
        result = {"numbers": fn(ctx)}
    except BaseException as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    result_path.write_text(json.dumps(result, default=float))
    return 0 if "numbers" in result else 1


def run_check(cid: str, args, out: Path, log_dir: Path) -> dict:
    _, title, gpu_timeout, dry_timeout = CHECKS[cid]
    timeout = dry_timeout if args.dry_run else gpu_timeout
    log_path, result_path = log_dir / f"{cid}.log", log_dir / f"{cid}.json"
    result_path.unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # CPU substitutes even where a GPU is present
    cmd = [sys.executable, __file__, "--child", cid, "--work", str(args.work), "--result", str(result_path)]
    cmd += ["--dry-run"] if args.dry_run else []
    t0, timed_out = time.perf_counter(), False
    with log_path.open("w") as log:
        # a session of its own: on timeout the whole tree (spawned ranks, Ray) is signalled by the group's id
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(child)
    entry = {"title": title, "seconds": time.perf_counter() - t0, "log": str(log_path.relative_to(out))}
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result_path.unlink(missing_ok=True)
    if timed_out:
        result = {"error": f"timed out after {timeout} s"}
    elif not result:
        result = {"error": f"exit code {child.returncode}; last line: {_last_line(log_path)}"}
    if "numbers" in result:
        return {**entry, "status": "ok", "numbers": result["numbers"], "summary": key_numbers(cid, result["numbers"])}
    return {**entry, "status": "FAIL", "error": result["error"], "summary": result["error"]}


def _stop_group(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "deepspeed", "ray", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def write_results(payload: dict, out: Path, name: str, log_dir: Path) -> list[Path]:
    rows = [["check", "status", "key numbers", "seconds"], ["---"] * 4]
    for cid, c in payload["checks"].items():
        rows.append([cid, c["status"], c["summary"].replace("|", "/"), f"{c['seconds']:.1f}" if "seconds" in c else ""])
    md = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    mode = "dry run (CPU substitutes)" if payload["dry_run"] else "GPU"
    gpus = ", ".join(payload["machine"]["gpus"]) or "no GPU"
    found = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    header = f"gpu_check ({mode}) on {gpus}; {payload['wall_s']:.0f} s wall; {found}"
    text = f"{header}\n\n{md}\n"
    print("\n" + text, flush=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    md_path.write_text(text)
    written = [json_path, md_path, *(out / c["log"] for c in payload["checks"].values() if "log" in c)]
    if os.environ.get("OUT"):  # the device tool returns what is written under $OUT
        dest = Path(os.environ["OUT"])
        (dest / log_dir.name).mkdir(parents=True, exist_ok=True)
        for f in written:
            shutil.copy(f, dest / (f.name if f.parent == out else f"{log_dir.name}/{f.name}"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo and the tiny model instead of CUDA, NCCL, 0.5B")
    p.add_argument("--only", default="a,b,c,d", help="comma-separated letters of the checks to run (default all)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS.relative_to(ROOT)}; dry run: --work)")
    p.add_argument("--work", default=None, help="models and PPO output (default runs/gpu_check[_dry_run])")
    p.add_argument("--child", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # the runner starts checks with these
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    name = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    args.work = Path(args.work or ROOT / "runs" / name).resolve()
    if args.child:
        return run_child(args.child, Context(args.dry_run, args.work), Path(args.result))

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {v[0] for v in CHECKS.values()}
    if unknown:
        p.error(f"--only {args.only}: unknown check(s) {sorted(unknown)}; choose from a, b, c, d")
    # dry-run numbers say nothing about a GPU: they stay out of benchmarks/results
    out = Path(args.out or (args.work if args.dry_run else RESULTS)).resolve()
    log_dir = out / f"{name}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checks = {}
    for cid, (letter, title, *_) in CHECKS.items():
        if letter not in only:
            checks[cid] = {"title": title, "status": "skipped", "summary": "not in --only"}
            continue
        print(f"[{cid}] {title} ...", flush=True)
        c = checks[cid] = run_check(cid, args, out, log_dir)
        print(f"[{cid}] {c['status']} in {c['seconds']:.1f} s: {c['summary']}", flush=True)
    payload = {
        "dry_run": args.dry_run,
        "ok": all(c["status"] != "FAIL" for c in checks.values()),
        "wall_s": time.perf_counter() - t0,
        "machine": machine(),
        "versions": versions(),
        "sizes": asdict(DRY_SIZES if args.dry_run else GPU_SIZES),
        "checks": checks,
    }
    write_results(payload, out, name, log_dir)
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
