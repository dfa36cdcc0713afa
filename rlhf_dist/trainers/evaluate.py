"""`rlhf-dist eval CONFIG --policy DIR [--baseline DIR]`: a trained policy, and optionally a baseline, on held-out
prompts, in this one process (no Ray): the rollout, reference and reward roles run in-process, generation with
Hugging Face ``generate``.

Each policy answers ``eval.samples`` times each of ``data.eval_prompts`` held-out prompts (``held_out_prompts``),
with the same seeds for both policies, so sample i of the policy and of the baseline share their prompt and their
random draws. Per policy:
- ``reward``: the judge's mean score. The judge is the run's own reward: reward.function, model.reward and/or
  reward.endpoint, weighted and clipped as in training;
- ``gold``: the synthetic task's hidden gold reward (NaN for other tasks);
- ``kl_to_ref``: KL(pi || ref) per token, ``algo.kl_estimator`` on the policy's own samples (rlhf_dist/algo/kl.py),
  ref = model.reference, else model.policy (the model PPO started from), both at ``generation.temperature``;
- ``response_len``: tokens per response; ``distinct_1`` / ``distinct_2``: distinct n-grams of the responses' words
  over all their n-grams (Li et al. 2016), low when the policy repeats itself;
- ``win_rate``: the share of samples the judge scores above the other policy's sample of the same prompt and seed,
  ties counting half.
A table on the console, and eval.json, samples.jsonl and eval.png in a new folder under ``eval.output_dir``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlhf_dist import run_dir
from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import repeat_interleave
from rlhf_dist.metrics import json_safe
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.models.tiny import ensure_tiny_model
from rlhf_dist.trainers.compare import EVAL_ITERATION, held_out_prompts
from rlhf_dist.trainers.eval_metrics import format_table, sample_metrics, win_rate
from rlhf_dist.workers.reference import ReferenceWorker
from rlhf_dist.workers.reward import RewardWorker
from rlhf_dist.workers.rollout import RolloutWorker

COLUMNS = (
    ("reward", "reward"),
    ("gold", "gold"),
    ("kl_to_ref", "KL to ref"),
    ("response_len", "length"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("win_rate", "win rate"),
)


def eval_config(cfg: RunConfig) -> RunConfig:
    """The run's config as the in-process roles read it: HF generate, eval.max_new_tokens, one tokenizer and one
    reference for every policy, the reference's forward passes in generation-sized chunks, the reward model loaded
    here (no Ray, so no Serve deployment)."""
    if cfg.data.eval_prompts < 1:
        raise ConfigError("data.eval_prompts", "0, but eval needs held-out prompts; set data.eval_prompts=64")
    m, g, t, r = cfg.model, cfg.generation, cfg.train, cfg.reward
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, tokenizer=m.tokenizer or m.policy, reference=m.reference or m.policy),
        generation=dataclasses.replace(g, engine="hf", max_new_tokens=cfg.eval.max_new_tokens or g.max_new_tokens),
        train=dataclasses.replace(t, micro_batch_size=t.micro_batch_size or g.batch_size),
        reward=dataclasses.replace(r, serve=dataclasses.replace(r.serve, enabled=False)),
    )


def judge(cfg: RunConfig) -> str:
    r, parts = cfg.reward, []
    if r.function:
        parts.append(f"{r.function_weight:g} x reward.function {r.function}")
    if cfg.model.reward:
        parts.append(f"{r.model_weight:g} x model.reward {cfg.model.reward}")
    if r.endpoint:
        parts.append(f"{r.endpoint_weight:g} x reward.endpoint {r.endpoint}")
    return " + ".join(parts) + (f", clipped to +-{r.clip:g}" if r.clip is not None else "")


def eval_prompts(cfg: RunConfig) -> pa.RecordBatch:
    cfg = eval_config(cfg)
    return held_out_prompts(cfg, load_tokenizer(cfg.model.tokenizer))


def evaluate(
    cfg: RunConfig, policies: dict[str, str], prompts: pa.RecordBatch
) -> tuple[dict[str, dict[str, float]], dict[str, pa.RecordBatch]]:
    """({name: metrics}, {name: its samples with reward and gold columns}) for every policy dir in `policies`, on
    `prompts` (eval_prompts); with two policies, each one's win rate is against the other."""
    cfg = eval_config(cfg)
    batch = repeat_interleave(prompts, cfg.eval.samples)
    reward, reference = RewardWorker(cfg), ReferenceWorker(cfg)
    metrics, samples = {}, {}
    for name, path in policies.items():
        rollout = RolloutWorker(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=path)))
        sampled = rollout.generate(batch, EVAL_ITERATION)
        del rollout  # one policy in memory at a time
        scores = reward.score(sampled)
        metrics[name] = sample_metrics(sampled, scores, reference.logprobs(sampled), cfg.algo.kl_estimator)
        samples[name] = sampled.append_column(S.REWARD, scores.column(S.REWARD)).append_column(
            S.GOLD_REWARD, scores.column(S.GOLD_REWARD)
        )
    names = list(policies)
    for name in names:
        others = [o for o in names if o != name]
        metrics[name]["win_rate"] = (
            win_rate(_rewards(samples[name]), _rewards(samples[others[0]])) if len(others) == 1 else math.nan
        )
    return metrics, samples


def _rewards(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column(S.REWARD).to_numpy(zero_copy_only=False)


def check_policy_dir(flag: str, path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(
            None,
            f"{flag} {path!r} is not a saved model (no config.json); pass a Hugging Face model dir, e.g. "
            "<output_dir>/policy from rlhf-dist train",
        )


def new_folder(root: Path, name: str) -> Path:
    """A folder of its own under `root` (created here, so no other eval writes into it): <UTC time>-<name>[-k]."""
    root.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + (re.sub(r"[^\w.-]+", "_", name) or "policy")
    for k in itertools.count(1):
        path = root / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def run(cfg: RunConfig, policy: str, baseline: str | None = None) -> dict:
    check_policy_dir("--policy", policy)
    if baseline is not None:
        check_policy_dir("--baseline", baseline)
    ensure_tiny_model(cfg)  # the reference: model.policy
    t0 = time.perf_counter()
    prompts = eval_prompts(cfg)  # a bad prompts file fails before a folder is made
    out = new_folder(Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval"), Path(policy).resolve().name)
    with run_dir.claim(dataclasses.replace(cfg, output_dir=str(out)), "eval"):
        policies = {"policy": policy} | ({"baseline": baseline} if baseline is not None else {})
        metrics, samples = evaluate(cfg, policies, prompts)
        result = {
            "metrics": metrics,
            "policies": {name: str(Path(p).resolve()) for name, p in policies.items()},
            "judge": judge(cfg),
            "prompts": len(prompts),
            "samples_per_prompt": cfg.eval.samples,
            "kl_estimator": cfg.algo.kl_estimator,
            "seed": cfg.seed,
            "wall_s": time.perf_counter() - t0,
        }
        (out / "eval.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
        with open(out / "samples.jsonl", "w") as f:
            for name, batch in samples.items():
                for row in batch.select([S.PROMPT_TEXT, S.RESPONSE_TEXT, S.REWARD, S.GOLD_REWARD]).to_pylist():
                    f.write(json.dumps(json_safe({"policy": name, **row})) + "\n")
        plot_path = plot(metrics, out / "eval.png")
    result.update(dir=str(out), json_path=str(out / "eval.json"), plot_path=str(plot_path) if plot_path else None)
    print(report(result), flush=True)
    return result


def report(result: dict) -> str:
    lines = [
        format_table(result["metrics"], COLUMNS),
        f"{result['prompts']} held-out prompts x {result['samples_per_prompt']} samples; judge: {result['judge']}; "
        f"KL {result['kl_estimator']} per token; {result['wall_s']:.0f} s",
        f"eval: {result['json_path']}" + (f", plot {result['plot_path']}" if result.get("plot_path") else ""),
    ]
    return "\n".join(lines)


def plot(metrics: dict[str, dict[str, float]], path: Path) -> Path | None:
    """One bar panel per measured metric, a bar per policy; skipped quietly when matplotlib is missing."""
    try:
        import matplotlib  # deferred: matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: matplotlib
    except ImportError:
        return None
    names = list(metrics)
    shown = [(k, t) for k, t in COLUMNS if any(not math.isnan(metrics[n].get(k, math.nan)) for n in names)]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.1 * len(shown), 2.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown):
        ax.bar(names, [metrics[n].get(key, math.nan) for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
