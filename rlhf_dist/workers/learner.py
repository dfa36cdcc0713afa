"""What the policy and critic learners share: a data-parallel process group, a training engine, mini-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlhf_dist.algo import NonFiniteError, first_and_count, nonfinite_rows
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
        self._skips_in_a_row = 0  # optimizer steps not applied since the last applied one

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
        """All epochs and mini-batches of one iteration; returns the mean of each statistic over the steps, and
        the counts ``<role>/skipped_steps`` (updates not applied) and ``<role>/nonfinite_losses`` (micro-batches)."""
        totals: dict[str, float] = {}
        steps = 0
        counts = {f"{self.role}/skipped_steps": 0, f"{self.role}/nonfinite_losses": 0}
        t = self.cfg.train
        for micro_batches in self.mini_batches(batch):
            epoch, mini = divmod(steps, t.mini_batches)
            where = (
                f"optimizer step {steps + 1} of this train call (epoch {epoch + 1}/{t.ppo_epochs}, mini-batch "
                f"{mini + 1}/{t.mini_batches})"
            )
            stats, bad_losses = self.step(micro_batches, loss_fn, where)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            counts[f"{self.role}/skipped_steps"] += not stats[f"{self.role}/stepped"]
            counts[f"{self.role}/nonfinite_losses"] += bad_losses
            steps += 1
        return {**{k: v / max(1, steps) for k, v in totals.items()}, **counts}

    def tensors(self, batch: pa.RecordBatch, columns: tuple[str, ...]) -> tuple[Sequences, dict[str, torch.Tensor]]:
        """The joined sequences of ``batch`` and its per-token float ``columns`` ``[B, T]`` (0 on padding), all on
        this worker's device."""
        dev = device()
        seqs = to_sequences(batch, self.tokenizer.pad_token_id).to(dev)
        return seqs, {c: to_padded(batch, c, pad_value=0.0, dtype=torch.float32)[0].to(dev) for c in columns}

    def training_tensors(
        self, batch: pa.RecordBatch, columns: tuple[str, ...], checked: tuple[str, ...]
    ) -> tuple[Sequences, dict[str, torch.Tensor], torch.Tensor]:
        """``tensors`` plus the mask to train with: the response mask without the samples whose ``checked`` columns
        hold a NaN or inf (the driver marks a sample it skips with NaN advantages and returns). Such a sample stops
        the run under ``train.on_nonfinite=stop``; under ``skip`` it is left out of the loss (the losses in algo/
        never read a masked position, so its NaN cannot leak)."""
        x = {c: to_padded(batch, c, pad_value=0.0, dtype=torch.float32) for c in columns}
        bad = torch.zeros(len(batch), dtype=torch.bool)
        for c in checked:  # on the host, before the copy: no device sync
            rows = nonfinite_rows(*x[c])
            if self.cfg.train.on_nonfinite == "stop":
                self._check_input(rows, c, x[c][0], batch)
            bad |= rows
        dev = device()
        seqs = to_sequences(batch, self.tokenizer.pad_token_id).to(dev)
        mask = seqs.response_mask & (~bad).to(dev)[:, None] if bad.any() else seqs.response_mask
        return seqs, {c: v.to(dev) for c, (v, _) in x.items()}, mask

    def step(self, micro_batches: list[pa.RecordBatch], loss_fn, where: str = "") -> tuple[dict[str, float], int]:
        """Accumulate over micro-batches, then one optimizer step; returns token-weighted mean stats and how many
        micro-batches had a non-finite loss.

        A non-finite loss stops the run (``train.on_nonfinite=stop``) before the step, or is backpropagated: its NaN
        gradients make the engine skip the step (engines/training/base.py). A skipped step stops the run under
        ``stop`` (not in float16, where loss-scale overflows are routine), and ``train.max_skipped_steps`` of them in
        a row stop it either way.
        """
        totals: dict[str, float] = {}
        n_tokens = sum(_response_tokens(m) for m in micro_batches) or 1
        bad_losses = 0
        for i, micro in enumerate(micro_batches):
            loss, stats = loss_fn(micro)
            self.engine.backward(loss)
            value = float(loss.detach())  # after the backward is queued, where the stats below sync anyway
            if not math.isfinite(value):
                bad_losses += 1
                if self.cfg.train.on_nonfinite == "stop":
                    raise NonFiniteError(
                        f"{self._who(micro)}: the loss is {value} at micro-batch {i + 1}/{len(micro_batches)} of "
                        f"{where}; no update was applied. Set train.on_nonfinite=skip to skip such steps"
                    )
            w = _response_tokens(micro) / n_tokens
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) * w
        out = self.engine.step()
        totals.update({f"{self.role}/{k}": float(v) for k, v in out.items()})
        self._count_skip(out, where, micro_batches[0])
        return totals, bad_losses

    def _count_skip(self, out: dict, where: str, micro: pa.RecordBatch) -> None:
        if out["stepped"]:
            self._skips_in_a_row = 0
            return
        self._skips_in_a_row += 1
        t, norm = self.cfg.train, out["grad_norm"]
        if t.on_nonfinite == "stop" and self.cfg.model.dtype != "float16":
            raise NonFiniteError(
                f"{self._who(micro)}: the gradient norm is {norm} at {where}; the update was not applied. Set "
                f"train.on_nonfinite=skip to skip such steps (at most train.max_skipped_steps={t.max_skipped_steps} "
                "in a row)"
            )
        if self._skips_in_a_row >= t.max_skipped_steps:
            raise NonFiniteError(
                f"{self._who(micro)}: {self._skips_in_a_row} optimizer steps in a row were skipped (non-finite "
                f"gradients or fp16 overflow; the last at {where}, gradient norm {norm}), "
                f"train.max_skipped_steps={t.max_skipped_steps}; lower the learning rate or find the bad data"
            )

    def _who(self, batch: pa.RecordBatch) -> str:
        version = batch.column(S.POLICY_VERSION)[0].as_py() if S.POLICY_VERSION in batch.schema.names else None
        samples = f", samples of policy version {version}" if version is not None else ""
        return f"{self.role} learner rank {self.rank}{samples}"

    def _check_input(self, rows: torch.Tensor, column: str, x: torch.Tensor, batch: pa.RecordBatch) -> None:
        first, count = first_and_count(rows)
        if count:
            sample = batch.column(S.SAMPLE_ID)[first].as_py() if S.SAMPLE_ID in batch.schema.names else first
            value = float(x[first][~torch.isfinite(x[first])][0])
            raise NonFiniteError(
                f"{self._who(batch)}: {column} is {value} for sample {sample} (row {first} of a micro-batch of "
                f"{len(rows)}), {count} non-finite; set train.on_nonfinite=skip to train without such samples"
            )

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
