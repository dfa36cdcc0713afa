"""The training-engine interface learners (policy, critic, SFT, RM, DPO) use without knowing the backend.

A learner does, per micro-batch::

    out = engine(input_ids=..., attention_mask=...)   # forward
    engine.backward(loss)                             # loss of THIS micro-batch (mean over its tokens)
    stats = engine.step()                             # updates once grad_accum_steps backwards accumulated

and, for weight sync / saving, iterates ``engine.named_full_parameters()`` on every rank (a collective under
ZeRO-3). Two backends implement it: DeepSpeed ZeRO 0-3 (``deepspeed_engine.py``) and plain torch
(``torch_engine.py``), for where DeepSpeed cannot run.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")

# A module, or a zero-argument function that builds one. The function form lets ZeRO-3 build the model already
# partitioned (each rank never holds the full weights); see DeepSpeedTrainEngine.
ModelOrFactory = nn.Module | Callable[[], nn.Module]


@dataclass
class TrainOptions:
    """What a learner asks of its optimiser and engine. Engines translate it (DeepSpeed: into its config dict)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping; the norm is still reported
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3; the torch engine ignores it
    offload: bool = False  # GPU only: optimizer state (and params at stage 3) in host memory
    grad_accum_steps: int = 1
    micro_batch_size: int = 1  # per rank; DeepSpeed books it, batches themselves come from the learner
    dtype: str = "bfloat16"  # "float32" | "bfloat16" | "float16" (float16 needs CUDA: loss scaling)
    gradient_checkpointing: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    lr_warmup_steps: int = 0  # linear warm-up over this many optimizer steps
    lr_schedule: str = "constant"  # after warm-up: "constant" | "cosine" (cosine needs total_steps)
    total_steps: int = 0  # optimizer steps in the run; only the cosine schedule reads it
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives lists

        def bad(key: str, fix: str) -> ValueError:
            return ValueError(f"TrainOptions.{key}={getattr(self, key)!r}: {fix}")

        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", "must be one of 0, 1, 2, 3")
        if self.offload and self.zero_stage == 0:
            raise bad("offload", "offload needs zero_stage >= 1 (optimizer) or 3 (parameters too)")
        if self.grad_accum_steps < 1:
            raise bad("grad_accum_steps", "must be >= 1")
        if self.micro_batch_size < 1:
            raise bad("micro_batch_size", "must be >= 1")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {sorted(DTYPES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "must be > 0")
        if self.lr_warmup_steps < 0:
            raise bad("lr_warmup_steps", "must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"must be one of {LR_SCHEDULES}")
        if self.lr_schedule == "cosine" and self.total_steps <= self.lr_warmup_steps:
            raise bad("total_steps", "the cosine schedule needs total_steps > lr_warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def lr_factor(options: TrainOptions, step: int) -> float:
    """Multiplier on ``options.lr`` for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < options.lr_warmup_steps:
        return (step + 1) / options.lr_warmup_steps
    if options.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - options.lr_warmup_steps) / (options.total_steps - options.lr_warmup_steps))
    return options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(options, step))


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's full shape; under ZeRO-3 the local tensor is a (possibly empty) shard and ds_shape is truth."""
    return getattr(param, "ds_shape", param.shape)


def optimizer_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay, biases and norm scales (1-D) do not -- the usual LM recipe."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def prepare_module(module: nn.Module, options: TrainOptions) -> None:
    """Backend-independent module set-up before an engine wraps it."""
    if options.gradient_checkpointing:
        if not hasattr(module, "gradient_checkpointing_enable"):
            raise TypeError(
                f"TrainOptions.gradient_checkpointing=True but {type(module).__name__} has no "
                "gradient_checkpointing_enable(); use a Hugging Face PreTrainedModel or turn it off"
            )
        # Non-reentrant checkpointing works with ZeRO-3's parameter hooks and with inputs that need no grad.
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(getattr(module, "config", None), "use_cache", False):
            module.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that needs more than torch's weights-only unpickler: refused, as unpickling it could run
    code."""

    @classmethod
    def of(cls, file: str | os.PathLike, err: Exception) -> UnsafeCheckpointError:
        """One line from torch's many-line weights-only error: the file and the global it refused."""
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it names {found.group(1)}" if found else str(err).strip().splitlines()[-1][:200]
        return cls(
            f"{file} holds more than tensors and plain containers ({what}); refusing to unpickle it, as that could "
            "run code. Load only checkpoints written by save_checkpoint"
        )


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``path``: readers never see a half-written directory.

    An existing ``path`` is moved aside first and deleted after the rename, so there is a brief instant with no
    directory at ``path`` but never a mixed one.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a saved model is meant to be read by other users/processes
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


class TrainEngine(ABC):
    """A trainable module plus its optimizer, LR schedule, data parallelism and checkpointing."""

    options: TrainOptions
    rank: int
    world_size: int

    # ---- the module -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The trainable module, unwrapped (HF naming). Under ZeRO-3 its parameters are shards: read them only
        through named_full_parameters()."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where inputs must live."""

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # ---- optimisation -----------------------------------------------------------------------------------------
    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; the engine divides by grad_accum_steps and averages over ranks.

        At most grad_accum_steps backwards may precede a step() (an error otherwise, not a silent drift).
        """

    @abstractmethod
    def step(self) -> dict[str, float | bool]:
        """Optimizer step once grad_accum_steps backwards have accumulated: clip, update, LR schedule step.

        Call it after every backward() or once after the last micro-batch's; both work. Before the boundary it
        does nothing. Returns ``{"stepped": bool, "grad_norm": float, "lr": float}``: ``grad_norm`` is the global
        norm before clipping (NaN when no step happened), ``lr`` the learning rate the step used (or would use).

        A step whose global gradient norm is NaN or inf (or an fp16 overflow) is not applied, on every backend and
        dtype: the gradients are dropped, the LR schedule stays, ``stepped`` is False and ``skipped_steps`` grows.
        """

    _pending_backwards: int = 0

    def _count_backward(self) -> bool:
        """Book one backward; True when it completes the accumulation (the gradient reduction happens in it)."""
        if self._pending_backwards >= self.options.grad_accum_steps:
            raise RuntimeError(
                f"{type(self).__name__}.backward: {self._pending_backwards + 1} backwards without step(), but "
                f"grad_accum_steps={self.options.grad_accum_steps}; call step() after each accumulation"
            )
        self._pending_backwards += 1
        return self._pending_backwards == self.options.grad_accum_steps

    def _at_boundary(self) -> bool:
        return self._pending_backwards == self.options.grad_accum_steps

    @property
    @abstractmethod
    def global_steps(self) -> int:
        """Optimizer steps taken so far."""

    @property
    @abstractmethod
    def skipped_steps(self) -> int:
        """Accumulation boundaries whose update was not applied so far (non-finite gradients, fp16 overflow)."""

    # ---- full weights (collective under ZeRO-3) ---------------------------------------------------------------
    @abstractmethod
    def named_full_parameters(
        self,
        device: str | torch.device = "cpu",
        rank0_only: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (gathered) parameters, HF names, as copies on ``device``.

        Every rank must iterate this to the end: under ZeRO-3 each group of parameters is all-gathered (a few at a
        time, so memory stays bounded). With ``rank0_only`` the other ranks take part in the gathers but yield
        nothing.
        """

    def full_parameter_shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """name -> (full shape, dtype), without communication: what a receiver needs to size buckets ahead."""
        return {n: (torch.Size(full_shape(p)), p.dtype) for n, p in self.module.named_parameters()}

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_hf(self, path: str | os.PathLike, tokenizer: Any = None) -> None:
        """Collective. Rank 0 writes a ``from_pretrained``-loadable directory with the full weights (atomically)."""
        module = self.module
        if not hasattr(module, "save_pretrained"):
            raise TypeError(f"save_hf needs a Hugging Face PreTrainedModel, got {type(module).__name__}")
        full = dict(self.named_full_parameters(device="cpu", rank0_only=True))
        if self.rank == 0:
            state_dict = self._full_state_dict(full)

            def write(tmp: Path) -> None:
                module.save_pretrained(tmp, state_dict=state_dict)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)

            atomic_write_dir(path, write)
        self.barrier()

    def _full_state_dict(self, full_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's state_dict keys, parameters replaced by their gathered copies (tied names share one copy),
        persistent buffers (never partitioned) copied as they are."""
        name_of = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            if id(value) in name_of:
                out[key] = full_params[name_of[id(value)]]
            else:
                out[key] = value.detach().to("cpu", copy=True)
        return out

    @abstractmethod
    def save_checkpoint(self, path: str | os.PathLike, client_state: dict | None = None) -> None:
        """Collective. Model, optimizer and LR-scheduler state (plus ``client_state``) for resuming."""

    @abstractmethod
    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Collective. Restore what save_checkpoint wrote; returns its ``client_state``."""

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
