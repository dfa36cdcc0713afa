"""Side by side with TRL's GRPOTrainer: the same tiny local model, prompts, reward function and batch shape.

    bash benchmarks/setup_bench.sh          # once: .venv-bench with TRL (the main .venv is left alone)
    python benchmarks/vs_trl.py             # both sides, one after the other; table + benchmarks/results/vs_trl.json
    python benchmarks/vs_trl.py --prompts 16 --generations 8 --max-new-tokens 32 --iters 20

GRPO against GRPO is the cleanest pair: G samples per prompt, P prompts per step, T new tokens at most, one optimizer
step per iteration on all P x G samples, a k3 KL to a frozen reference in the loss (beta = kl_coef = 0.04), clip 0.2,
token-mean loss over the batch (TRL's default loss_type "dapo"), group-normalised advantages (std, unbiased). TRL runs
in .venv-bench (a subprocess); ours runs in this interpreter's venv (.venv by default) as
``benchmarks/throughput.py configs/grpo_tiny_cpu.yaml`` with the same shape. What still differs is printed with the
table (and kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, load_line, machine, mean, overhead_share, table, write_json  # noqa: E402

MODEL = ROOT / "runs" / "bench_models" / "tiny_grpo"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
DIFFERENCES = [
    "process layout: TRL is one process in which generation, reference, reward and training take turns (run with 1 "
    "and with 2 torch threads; the faster is compared); ours is 4 Ray actors with 1 torch thread each (rollout, "
    "reward, reference, policy) plus the driver, so reference and learner log-probs run side by side",
    "gradient checkpointing is off on both sides (TRL's default is on; it is set off here)",
    "old log-probs: with one step per iteration both sides take the detached current ones (ours also as the "
    "off-policy correction's proximal policy in the pipelined modes); ours computes the learner's log-probs of an "
    "eighth of the samples every sync.check_every=10 iterations (the stale-weight check; in the pipelined modes "
    "the rollout engine scores the same eighth right after the push, nothing drained)",
    "ours pushes the new weights to the rollout actor every iteration (object store); TRL generates with the model "
    "it trains (no sync)",
    "ours tokenises prompts with the tokenizer's special tokens (a BOS first); TRL's GRPOTrainer does not add them: "
    "prompts are one token longer on our side",
    "generation: both Hugging Face generate with a KV cache on CPU, sampling at temperature 1.0, top_p 1, top_k off",
]


def shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration (default 8, as grpo_tiny_cpu.yaml)")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt, the GRPO group (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="(default 16)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, k3 in the loss (default 0.04)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)


def ensure_model() -> Path:
    from rlhf_dist.models.tiny import build_tiny

    return build_tiny(MODEL, seed=1)


# -- TRL's side (runs inside .venv-bench) ----------------------------------------------------------------------
def trl_side(a: argparse.Namespace) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_dist.data.synthetic import make_prompts, preference_reward

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    dataset = Dataset.from_dict({"prompt": make_prompts(a.num_prompts, seed=a.seed)})

    def preference(prompts, completions, **_):
        return preference_reward(list(prompts), list(completions))

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.logs = [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    clock = Clock()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.prompts * a.generations,
            gradient_accumulation_steps=1,
            num_generations=a.generations,
            max_completion_length=a.max_new_tokens,
            learning_rate=a.lr,
            beta=a.beta,
            num_iterations=1,
            epsilon=0.2,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            loss_type="dapo",
            scale_rewards="group",
            max_steps=a.warmup + a.iters,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            seed=a.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False,  # TRL's default is on; ours is off (train.gradient_checkpointing)
        )
        trainer = GRPOTrainer(
            model=a.model,
            processing_class=tokenizer,
            reward_funcs=preference,
            args=cfg,
            train_dataset=dataset,
            callbacks=[clock],
        )
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    steps = [e - s for s, e in zip(clock.ends[a.warmup - 1 :], clock.ends[a.warmup :])] if a.warmup else []
    logs = clock.logs[a.warmup : a.warmup + len(steps)]
    samples = a.prompts * a.generations
    generated = [lg["completions/mean_length"] * samples for lg in logs]
    wall = sum(steps)
    return {
        "side": "trl",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_iteration": wall / len(steps),
        "samples_per_s": samples * len(steps) / wall,
        "generated_tokens_per_s": sum(generated) / wall,
        "response_len_mean": mean(lg["completions/mean_length"] for lg in logs),
        "total_s": total,
        "iterations": len(steps),
        "reward_last": logs[-1].get("reward") if logs else None,
    }


# -- ours -------------------------------------------------------------------------------------------------------
def ours_side(a: argparse.Namespace, python: str) -> dict:
    overrides = [
        f"model.policy={a.model}",
        f"train.prompts_per_iteration={a.prompts}",
        f"generation.samples_per_prompt={a.generations}",
        f"generation.max_new_tokens={a.max_new_tokens}",
        "generation.temperature=1.0",
        "generation.top_p=1.0",
        "generation.top_k=0",
        "train.ppo_epochs=1",
        "train.mini_batches=1",
        f"train.policy_lr={a.lr}",
        f"algo.kl_coef={a.beta}",
        "algo.kl_estimator=k3",
        "algo.kl_mode=loss",
        "algo.estimator=grpo",
        "algo.clip_eps=0.2",
        f"data.num_prompts={a.num_prompts}",
        f"seed={a.seed}",
        f"generation.batch_size={a.prompts * a.generations}",  # one generate call per iteration, as TRL
    ]
    overrides += a.ours_overrides  # a schedule or layout for our side (benchmarks/modes.py names them)
    if a.ours_threads > 1:  # torch threads = the actor's num_cpus; generation and training run one after the other
        overrides += [
            f"roles.rollout.num_cpus={a.ours_threads}",
            f"roles.policy.num_cpus={a.ours_threads}",
            f"ray.num_cpus={2 + 2 * a.ours_threads}",
        ]
    cmd = [
        python,
        str(ROOT / "benchmarks" / "throughput.py"),
        str(ROOT / "configs" / "grpo_tiny_cpu.yaml"),
        *overrides,
        "--warmup",
        str(a.warmup),
        "--iters",
        str(a.iters),
        "--name",
        f"{a.name}_ours",
        "--quiet",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    res = json.loads((ROOT / "benchmarks" / "results" / f"{a.name}_ours.json").read_text())
    res["side"] = "rlhf_dist"
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape_args(p)
    p.add_argument("--trl-python", default=str(BENCH_PY), help="the venv with TRL (default .venv-bench)")
    p.add_argument("--ours-python", default=sys.executable, help="the venv for our side (default: this one)")
    p.add_argument(
        "--ours-threads",
        type=int,
        default=1,
        help="torch threads of our rollout and policy actors (their num_cpus; default 1, as the shipped config)",
    )
    p.add_argument(
        "--ours-overrides",
        nargs="*",
        default=[],
        help="config overrides for our side, e.g. train.mode=one_step_off algo.off_policy=tis algo.tis_cap=2.0",
    )
    p.add_argument("--name", default="vs_trl", help="benchmarks/results/NAME.json (ours alone: NAME_ours.json)")
    p.add_argument(
        "--trl-threads",
        default="1,2",
        help="torch threads for TRL, each tried; the fastest is compared "
        "(default 1,2: on a busy 2-core machine 2 threads can be slower)",
    )
    p.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)  # internal: run TRL's side here
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.trl_side:
        Path(a.json).write_text(json.dumps(trl_side(a)))
        return 0
    if not Path(a.trl_python).exists():
        p.error(f"{a.trl_python} not found: run `bash benchmarks/setup_bench.sh` first")
    a.model = str(ensure_model())
    info = machine()
    # TRL first, then ours, one at a time: never both on the CPU at once.
    trl_runs = []
    for threads in [int(x) for x in a.trl_threads.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [a.trl_python, __file__, "--trl-side", "--model", a.model, "--json", f.name, f"--threads={threads}"]
            cmd += [
                f"--{k.replace('_', '-')}={getattr(a, k)}"
                for k in (
                    "prompts",
                    "generations",
                    "max_new_tokens",
                    "lr",
                    "beta",
                    "warmup",
                    "iters",
                    "num_prompts",
                    "seed",
                )
            ]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            trl_runs.append(json.loads(Path(f.name).read_text()))
            print(
                f"TRL, {threads} torch thread(s): {trl_runs[-1]['seconds_per_iteration']:.3f} s/iteration", flush=True
            )
    trl_res = min(trl_runs, key=lambda r: r["seconds_per_iteration"])
    ours = ours_side(a, a.ours_python)
    res = {
        "machine": info,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "shape": {
            "prompts_per_iteration": a.prompts,
            "samples_per_prompt": a.generations,
            "max_new_tokens": a.max_new_tokens,
            "optimizer_steps_per_iteration": 1,
            "kl_coef": a.beta,
            "lr": a.lr,
            "warmup": a.warmup,
            "iterations": a.iters,
            "model": a.model,
            "ours_threads": a.ours_threads,
            "ours_overrides": a.ours_overrides,
        },
        "trl": trl_res,
        "trl_runs": trl_runs,
        "ours": {
            k: ours[k]
            for k in (
                "seconds_per_iteration",
                "samples_per_s",
                "generated_tokens_per_s",
                "response_len_mean",
                "overhead_frac",
                "stages_s",
                "startup_s",
                "total_s",
            )
        },
        "speedup": trl_res["seconds_per_iteration"] / ours["seconds_per_iteration"],
        "differences": DIFFERENCES,
    }
    path = write_json(a.name, res)
    print(render(res))
    print(f"\nresults: {path}")
    return 0


def render(res: dict) -> str:
    s, o, t = res["shape"], res["ours"], res["trl"]
    rows = [
        [
            f"rlhf_dist (Ray actors, {s['ours_threads']} thread)",
            o["seconds_per_iteration"],
            o["samples_per_s"],
            o["generated_tokens_per_s"],
            o["response_len_mean"],
        ],
        [
            f"TRL {t['trl']} GRPOTrainer ({t['torch_threads']} thread)",
            t["seconds_per_iteration"],
            t["samples_per_s"],
            t["generated_tokens_per_s"],
            t["response_len_mean"],
        ],
    ]
    return "\n\n".join(
        [
            f"GRPO, {s['prompts_per_iteration']} prompts x {s['samples_per_prompt']} samples, "
            f"<= {s['max_new_tokens']} new tokens, 1 optimizer step per iteration; {s['iterations']} measured after "
            f"{s['warmup']} warm-up iterations; {load_line(res['machine'])}, after: {res['load_avg_after']}",
            table(["", "s / iteration", "samples / s", "generated tokens / s", "mean response len"], rows),
            f"ratio: TRL s/iteration / ours = {res['speedup']:.2f} (above 1: ours is faster); our orchestration "
            f"overhead {overhead_share(o['overhead_frac'])}",
            "what differs:\n" + "\n".join(f"- {d}" for d in res["differences"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
