"""Plain-torch TrainEngine: one process, or data parallel over an initialised gloo/nccl group.

For where DeepSpeed cannot run (no compiler, odd platforms) and as the reference the DeepSpeed engine is tested
against. Data parallelism is DDP's arithmetic done by hand: parameters are broadcast from rank 0 at start, and
gradients are averaged with one all-reduce per dtype at the accumulation boundary. Doing it at the boundary
(instead of DDP's per-backward hooks) makes gradient accumulation need no ``no_sync`` bookkeeping, and tolerates
parameters that got no gradient on some rank (a value head's unused LM head, say).

Mixed precision: parameters and optimizer stay float32; bfloat16/float16 run the forward under autocast
(float16 adds a GradScaler, CUDA only).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_dist.comm.process_group import check_process_group
from rlhf_dist.engines.training.base import (
    ModelOrFactory,
    TrainEngine,
    TrainOptions,
    UnsafeCheckpointError,
    atomic_write_dir,
    make_lr_scheduler,
    optimizer_param_groups,
    prepare_module,
)

CHECKPOINT_FILE = "torch_engine.pt"


class TorchTrainEngine(TrainEngine):
    def __init__(self, model: ModelOrFactory, options: TrainOptions, rank: int = 0, world_size: int = 1) -> None:
        self.options, self.rank, self.world_size = options, rank, world_size
        cuda = torch.cuda.is_available()
        if options.dtype == "float16" and not cuda:
            raise ValueError(
                "TrainOptions.dtype='float16' needs CUDA (loss scaling); on CPU use 'bfloat16' or 'float32'"
            )
        if world_size > 1:
            check_process_group(type(self).__name__, rank, world_size)
        self._device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

        module = model if isinstance(model, nn.Module) else model()
        self._module = module.to(self._device, dtype=torch.float32)
        prepare_module(self._module, options)
        if world_size > 1:
            # Start identical on every rank, as DDP does.
            for t in list(self._module.parameters()) + list(self._module.buffers()):
                dist.broadcast(t.data, src=0)

        self._optimizer = torch.optim.AdamW(
            optimizer_param_groups(self._module, options.weight_decay),
            lr=options.lr,
            betas=options.betas,
            eps=options.eps,
        )
        self._scheduler = make_lr_scheduler(self._optimizer, options)
        self._autocast_dtype = None if options.dtype == "float32" else options.torch_dtype
        self._scaler = torch.amp.GradScaler("cuda") if options.dtype == "float16" else None
        self._global_steps = self._skipped_steps = 0

    # ---- module -----------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = (
            torch.autocast(self._device.type, dtype=self._autocast_dtype)
            if self._autocast_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            return self._module(*args, **kwargs)

    # ---- optimisation -----------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._count_backward()
        loss = loss / self.options.grad_accum_steps
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward()

    def step(self) -> dict[str, float | bool]:
        lr = float(self._optimizer.param_groups[0]["lr"])
        if not self._at_boundary():
            return {"stepped": False, "grad_norm": float("nan"), "lr": lr}
        self._pending_backwards = 0
        params = [p for p in self._module.parameters() if p.requires_grad]
        if self.world_size > 1:
            _average_gradients(params, self.world_size)
        if self._scaler is not None:
            self._scaler.unscale_(self._optimizer)
        max_norm = self.options.max_grad_norm if self.options.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self._scaler is not None:
            scale = self._scaler.get_scale()
            self._scaler.step(self._optimizer)  # skips the step on inf/nan gradients
            self._scaler.update()
            stepped = self._scaler.get_scale() >= scale
        else:
            stepped = math.isfinite(grad_norm)  # a NaN/inf gradient would make every weight NaN
            if stepped:
                self._optimizer.step()
        if stepped:
            self._scheduler.step()
            self._global_steps += 1
        else:
            self._skipped_steps += 1
        self._optimizer.zero_grad(set_to_none=True)
        return {"stepped": stepped, "grad_norm": grad_norm, "lr": lr}

    @property
    def global_steps(self) -> int:
        return self._global_steps

    @property
    def skipped_steps(self) -> int:
        return self._skipped_steps

    # ---- full weights -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def named_full_parameters(
        self,
        device: str | torch.device = "cpu",
        rank0_only: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if rank0_only and self.rank != 0:
            return
        for name, p in self._module.named_parameters():
            yield name, p.detach().to(device, copy=True)

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike, client_state: dict | None = None) -> None:
        # Every rank holds the same state after the averaged step, so rank 0 writes it all.
        if self.rank == 0:
            state = {
                "module": self._module.state_dict(),
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict(),
                "scaler": self._scaler.state_dict() if self._scaler is not None else None,
                "global_steps": self._global_steps,
                "skipped_steps": self._skipped_steps,
                "client_state": client_state or {},
            }
            atomic_write_dir(path, lambda tmp: torch.save(state, tmp / CHECKPOINT_FILE))
        self.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        file = Path(path) / CHECKPOINT_FILE
        if not file.is_file():
            raise FileNotFoundError(f"TorchTrainEngine.load_checkpoint: {file} not found (written by save_checkpoint)")
        try:  # tensors and plain containers only: a pickle naming any other class could run code on loading
            state = torch.load(file, map_location=self._device, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError.of(file, err) from None
        self._module.load_state_dict(state["module"])
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and state["scaler"] is not None:
            self._scaler.load_state_dict(state["scaler"])
        self._global_steps = state["global_steps"]
        self._skipped_steps = state.get("skipped_steps", 0)
        return state["client_state"]


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients, one flat buffer per dtype. A missing grad counts as zeros so every rank
    reduces the same buffers."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
