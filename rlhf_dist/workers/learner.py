"""What the policy and critic learners share: a data-parallel process group, a training engine, mini-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlhf_dist.comm.process_group import find_free_port, init_process_group, node_ip
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import Sequences, split_even, to_padded, to_sequences
from rlhf_dist.engines.training import TrainOptions, make_train_engine
from rlhf_dist.engines.weight_sync.client import RolloutClient
from rlhf_dist.engines.weight_sync.senders import make_sender
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.workers.common import derive_seed, device, setup_process


class Learner:
    """One rank of a data-parallel group of learners (DeepSpeed ZeRO, or plain torch)."""

    role = "learner"

    def __init__(self, cfg, rank: int, world_size: int, role_seed: int, num_cpus: float | None = None):
        threads = getattr(cfg.roles, self.role).num_cpus if num_cpus is None else num_cpus
        setup_process(derive_seed(cfg.seed, role_seed, rank), threads)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.engine = None

    # -- set-up: rank 0's address first, then every rank joins ----------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        ip = node_ip()
        return ip, find_free_port(ip)

    def init_group(self, master_addr: str, master_port: int) -> None:
        init_process_group(self.rank, self.world_size, master_addr, master_port)
        self.plan_steps()
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.policy)
        t = self.cfg.train
        options = TrainOptions(
            lr=self.learning_rate(),
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            zero_stage=t.zero_stage,
            offload=t.offload,
            grad_accum_steps=self.micro_per_step,
            micro_batch_size=self.micro_size,
            dtype=self.cfg.model.dtype,
            gradient_checkpointing=t.gradient_checkpointing,
        )
        self.engine = make_train_engine(t.engine, self.build_model(), options, self.rank, self.world_size)

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def learning_rate(self) -> float:
        raise NotImplementedError

    # -- the shape of one training call -----------------------------------------------------------------------
    def plan_steps(self) -> None:
        """Micro-batches per optimizer step, fixed for the run by the config alone.

        Each rank holds a shard that differs from the others by at most one row; a count that depends only on the
        config keeps every rank in lock-step (ZeRO collectives hang otherwise) and fixes DeepSpeed's accumulation.
        """
        t = self.cfg.train
        global_rows = t.prompts_per_iteration * self.cfg.generation.samples_per_prompt
        rows_per_mini = math.ceil(math.ceil(global_rows / self.world_size) / t.mini_batches)
        self.micro_size = t.micro_batch_size or rows_per_mini
        self.micro_per_step = math.ceil(rows_per_mini / self.micro_size)

    def mini_batches(self, batch: pa.RecordBatch) -> Iterator[list[pa.RecordBatch]]:
        """For every optimizer step of every epoch, the micro-batches to accumulate."""
        for _ in range(self.cfg.train.ppo_epochs):
            for mini in split_even(batch, self.cfg.train.mini_batches):
                yield split_even(mini, self.micro_per_step)

    def inference_chunks(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Forward-only chunks, as many on every rank (a ZeRO-3 forward is a collective)."""
        t = self.cfg.train
        rows_per_rank = math.ceil(t.prompts_per_iteration * self.cfg.generation.samples_per_prompt / self.world_size)
        return split_even(batch, math.ceil(rows_per_rank / self.micro_size))

    def fit(self, batch: pa.RecordBatch, loss_fn) -> dict[str, float]:
        """All epochs and mini-batches of one iteration; returns the mean of each statistic over the steps."""
        totals: dict[str, float] = {}
        steps = 0
        for micro_batches in self.mini_batches(batch):
            for k, v in self.step(micro_batches, loss_fn).items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
        return {k: v / max(1, steps) for k, v in totals.items()}

    def tensors(self, batch: pa.RecordBatch, columns: tuple[str, ...]) -> tuple[Sequences, dict[str, torch.Tensor]]:
        """The joined sequences of ``batch`` and its per-token float ``columns`` ``[B, T]`` (0 on padding), all on
        this worker's device."""
        dev = device()
        seqs = to_sequences(batch, self.tokenizer.pad_token_id).to(dev)
        return seqs, {c: to_padded(batch, c, pad_value=0.0, dtype=torch.float32)[0].to(dev) for c in columns}

    def step(self, micro_batches: list[pa.RecordBatch], loss_fn) -> dict[str, float]:
        """Accumulate over micro-batches, then one optimizer step; returns token-weighted mean stats."""
        totals: dict[str, float] = {}
        n_tokens = sum(_response_tokens(m) for m in micro_batches) or 1
        for micro in micro_batches:
            loss, stats = loss_fn(micro)
            self.engine.backward(loss)
            w = _response_tokens(micro) / n_tokens
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) * w
        totals.update({f"{self.role}/{k}": float(v) for k, v in self.engine.step().items()})
        return totals

    # -- weights out: learner rank 0 drives the rollout engines through vLLM's weight-transfer control plane -----
    def init_weight_sync(
        self, rollout_actors: list, transport: str, workers_per_engine: int, bucket_mb: int, timeout_s: float
    ) -> None:
        """Every rank: a sender for ``transport`` (engines/weight_sync/senders.py); rank 0 also opens the
        transport with the rollout engines (an NCCL group: learner rank 0 plus every engine worker)."""
        self.weight_client = RolloutClient(rollout_actors, workers_per_engine, timeout_s)
        world_size = 1 + len(rollout_actors) * workers_per_engine
        self.weight_sender = make_sender(
            transport,
            self.weight_client,
            self.rank,
            self.engine,
            bucket_mb * 2**20,
            self.rendezvous_address,
            world_size,
        )

    def push_weights(self, version: int) -> tuple[list[int], int] | None:
        """Collective over the learners (gathers under ZeRO-3). Rank 0 returns the version each rollout actor
        reports after the update, and the bytes it sent."""
        self.weight_client.version = version
        nbytes = self.weight_sender.send_weights()
        return (self.weight_client.versions, nbytes) if self.rank == 0 else None

    def save_hf(self, path: str) -> str:
        self.engine.save_hf(path, tokenizer=self.tokenizer)
        return path

    def save_checkpoint(self, path: str) -> None:
        self.engine.save_checkpoint(path, client_state={"torch_rng": torch.get_rng_state()})

    def load_checkpoint(self, path: str) -> None:
        state = self.engine.load_checkpoint(path) or {}
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])


def _response_tokens(batch: pa.RecordBatch) -> int:
    return int(pc.sum(pc.list_value_length(batch.column(S.RESPONSE_IDS))).as_py() or 0)
