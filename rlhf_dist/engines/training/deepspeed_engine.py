"""DeepSpeed ZeRO 0/1/2/3 behind the TrainEngine interface.

ZeRO-3 partitioning: a ready ``nn.Module`` is partitioned by ``deepspeed.initialize`` itself (every rank held the
full model for a moment: fine for models that fit in host memory; this is what the CPU tests do with HF Llama).
For models that must never be whole on one rank, pass a zero-argument factory that calls HF ``from_pretrained``
(or ``from_config``): it runs with an ``HfDeepSpeedConfig`` alive, so transformers builds it under
``deepspeed.zero.Init`` and loads each parameter through a gather (needs ``accelerate`` installed; see
``_hf_zero3_config``).

Optimizer: on GPU DeepSpeed builds its own AdamW from the config: torch's (``torch_adam``), or DeepSpeedCPUAdam
with offload (ZeRO-Offload needs it). On CPU we hand it a ``torch.optim.AdamW`` instance: DeepSpeed's CPU optimizers
would compile a C++ extension for ~90 s and gain nothing at test sizes.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_dist.comm.process_group import check_process_group
from rlhf_dist.engines.training.base import (
    ModelOrFactory,
    TrainEngine,
    TrainOptions,
    UnsafeCheckpointError,
    make_lr_scheduler,
    optimizer_param_groups,
    prepare_module,
)

logger = logging.getLogger(__name__)

# How many bytes of full parameters one ZeRO-3 gather materialises at once in named_full_parameters().
GATHER_BYTES = 256 << 20
CLIENT_STATE_KEY = "rlhf_dist_client_state"


def build_ds_config(options: TrainOptions, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for these options (exposed for tests and for logging the effective config)."""
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=int(5e7),
            # Overlapping the reduction with backward needs a side stream: GPU only.
            overlap_comm=on_gpu,
            contiguous_gradients=True,
        )
    if options.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(5e7),
            stage3_param_persistence_threshold=int(1e5),
            # We gather for saving ourselves (named_full_parameters), a few parameters at a time.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if options.offload and on_gpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if options.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": options.grad_accum_steps,
        "train_batch_size": options.micro_batch_size * options.grad_accum_steps * world_size,
        "gradient_clipping": options.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # we report our own metrics
        "wall_clock_breakdown": False,
        # A client (torch) optimizer under ZeRO is fine for AdamW; DeepSpeed only refuses untested ones by default.
        "zero_allow_untested_optimizer": True,
    }
    if options.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif options.dtype == "float16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if on_gpu:
        params = {
            "lr": options.lr,
            "betas": list(options.betas),
            "eps": options.eps,
            "weight_decay": options.weight_decay,
        }
        if not options.offload:
            # torch's AdamW (foreach kernels) instead of FusedAdam, which DeepSpeed JIT-builds with nvcc on first
            # use: minutes, or a crash where nvcc is missing. Offload keeps DeepSpeedCPUAdam, which ZeRO-Offload needs.
            params["torch_adam"] = True
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


class DeepSpeedTrainEngine(TrainEngine):
    def __init__(self, model: ModelOrFactory, options: TrainOptions, rank: int = 0, world_size: int = 1) -> None:
        self.options, self.rank, self.world_size = options, rank, world_size
        on_gpu = torch.cuda.is_available()
        if options.dtype == "float16" and not on_gpu:
            raise ValueError(
                "TrainOptions.dtype='float16' needs CUDA (DeepSpeed's loss scaling); on CPU use 'bfloat16' or 'float32'"
            )
        if options.offload and not on_gpu:
            logger.warning("TrainOptions.offload=True has no effect without a GPU (everything is in host memory)")
        check_process_group(type(self).__name__, rank, world_size)
        import deepspeed  # deferred: deepspeed (after the process group, which sets DS_ACCELERATOR on CPU)

        self.ds_config = build_ds_config(options, world_size, on_gpu)
        module = self._build_module(model)
        prepare_module(module, options)

        groups = optimizer_param_groups(module, options.weight_decay)
        if on_gpu:
            optimizer, params = None, groups  # DeepSpeed builds AdamW from the config, offload-aware
        else:
            optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.betas, eps=options.eps)
            params = None
        self._engine, self._optimizer, _, self._scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            model_parameters=params,
            # A callable so DeepSpeed hands it the optimizer it built; it steps it at each boundary and checkpoints it.
            lr_scheduler=lambda opt: make_lr_scheduler(opt, options),
            config=self.ds_config,
            dist_init_required=False,
        )
        self._zero3 = options.zero_stage == 3

    def _build_module(self, model: ModelOrFactory) -> nn.Module:
        if isinstance(model, nn.Module):
            return model
        if not callable(model):
            raise TypeError(f"DeepSpeedTrainEngine: model must be an nn.Module or a factory, got {type(model)}")
        if self.options.zero_stage == 3:
            # Kept alive on self: transformers finds it through a weakref and then partitions while it loads.
            self._hf_ds_config = _hf_zero3_config(self.ds_config)
        return model()

    # ---- module -----------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self._engine.device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def train(self) -> None:
        self._engine.train()

    def eval(self) -> None:
        self._engine.eval()

    # ---- optimisation -----------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        # We own the boundary (counting backwards) instead of DeepSpeed's micro-step counter, which only advances
        # in step(): so a learner may call step() once per accumulation as well as once per backward. DeepSpeed
        # divides by gradient_accumulation_steps and reduces gradients over ranks in the boundary backward.
        self._engine.set_gradient_accumulation_boundary(self._count_backward())
        self._engine.backward(loss)

    def step(self) -> dict[str, float | bool]:
        """DeepSpeed's own optimizers (ZeRO 1-3, and bf16/fp16 at stage 0) skip a step whose gradient norm is NaN or
        inf (bf16 through ``bf16.check_grad_overflow``, on by default). At stage 0 in float32 it steps the bare torch
        optimizer and would apply the NaN (tests/test_nonfinite.py pins both): that step we skip ourselves."""
        boundary = self._at_boundary()
        lr = float(self._engine.get_lr()[0])
        norm = self._plain_grad_norm() if boundary else None
        if norm is not None and not math.isfinite(norm):  # what DeepSpeed's _take_model_step does on an overflow
            self._engine.zero_grad()
            self._engine.skipped_steps += 1  # its counters, saved in its checkpoints
            self._engine.global_steps += 1
            self._pending_backwards = 0
            self._engine.set_gradient_accumulation_boundary(False)
            return {"stepped": False, "grad_norm": norm, "lr": lr}
        self._engine.step()  # a no-op (bookkeeping only) before the boundary
        if not boundary:
            return {"stepped": False, "grad_norm": float("nan"), "lr": lr}
        self._pending_backwards = 0
        self._engine.set_gradient_accumulation_boundary(False)  # a stray step() must not update again
        if norm is None:
            norm = self._engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return {"stepped": bool(self._engine.was_step_applied()), "grad_norm": norm, "lr": lr}

    def _plain_grad_norm(self) -> float | None:
        """Without ZeRO or mixed precision DeepSpeed clips with the module's grads but does not keep the norm;
        those grads are full and already averaged over ranks at the boundary, so compute it here."""
        if self._engine.zero_optimization() or self._engine.bfloat16_enabled() or self._engine.fp16_enabled():
            return None
        grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    @property
    def global_steps(self) -> int:
        return int(self._engine.global_steps) - int(self._engine.skipped_steps)  # DeepSpeed counts skipped ones too

    @property
    def skipped_steps(self) -> int:
        return int(self._engine.skipped_steps)

    # ---- full weights -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def named_full_parameters(
        self, device: str | torch.device = "cpu", rank0_only: bool = True, gather_bytes: int = GATHER_BYTES
    ) -> Iterator[tuple[str, torch.Tensor]]:
        keep = self.rank == 0 or not rank0_only
        named = list(self.module.named_parameters())
        if not self._zero3:
            if keep:
                for name, p in named:
                    yield name, p.detach().to(device, copy=True)
            return
        import deepspeed  # deferred: deepspeed

        for group in _groups_by_bytes(named, gather_bytes):
            # All ranks all-gather this group; the copies are taken inside, and yielded after the shards are
            # re-partitioned, so a slow consumer never keeps full parameters alive.
            with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                copies = [(n, p.data.to(device, copy=True)) for n, p in group] if keep else []
            yield from copies

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike, client_state: dict | None = None) -> None:
        # Collective; each rank writes its own optimizer partition, rank 0 the model states and a "latest" tag.
        # client_state goes under one key: DeepSpeed returns it merged with its own bookkeeping keys on load.
        self._engine.save_checkpoint(str(path), client_state={CLIENT_STATE_KEY: client_state or {}})

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        check_checkpoint_is_data(Path(path))
        loaded, client_state = self._engine.load_checkpoint(
            str(path), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(
                f"DeepSpeedTrainEngine.load_checkpoint: no DeepSpeed checkpoint under {path} "
                "(expected a 'latest' file written by save_checkpoint)"
            )
        return (client_state or {}).get(CLIENT_STATE_KEY, {})


def check_checkpoint_is_data(path: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files hold more than tensors, plain containers and DeepSpeed's own
    bookkeeping classes. DeepSpeed unpickles them with weights_only=False (its TorchCheckpointEngine.load) and has no
    switch, so torch's weights-only unpickler reads each file first, memory-mapped: the tensors are not read twice."""
    latest = path / "latest"
    if not latest.is_file():
        return  # DeepSpeed finds no checkpoint, and load_checkpoint says so
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # deferred: deepspeed
    from deepspeed.runtime.zero.config import ZeroStageEnum  # deferred: deepspeed
    from deepspeed.utils.tensor_fragment import fragment_address  # deferred: deepspeed

    # What DeepSpeed 0.19.8 pickles besides tensors (ZeRO optimizer states: the loss scaler, the stage, and for
    # bf16 the fragment addresses); plain data classes that run nothing when rebuilt.
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    with torch.serialization.safe_globals(allowed):
        for file in sorted((path / latest.read_text().strip()).rglob("*.pt")):
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError.of(file, err) from None


def _hf_zero3_config(ds_config: dict[str, Any]) -> Any:
    """Tell transformers that ZeRO-3 is on, so ``from_pretrained``/``from_config`` inside a factory build the
    model under ``deepspeed.zero.Init`` and load (or initialise) each parameter through a gather: no rank ever holds
    the whole model. We do not wrap the factory in ``zero.Init`` ourselves: HF's ``_init_weights`` would then run
    on empty shards and silently leave torch's default init (seen on CPU). transformers needs ``accelerate`` for
    this; without it the factory builds a whole module and ``deepspeed.initialize`` partitions it, as for a module.
    """
    try:
        from transformers.integrations import HfDeepSpeedConfig  # deferred: deepspeed

        return HfDeepSpeedConfig(ds_config)
    except ImportError as e:  # importlib's PackageNotFoundError is an ImportError
        logger.warning(
            "ZeRO-3 model factory: transformers' DeepSpeed integration is unavailable (%s); the model "
            "is built whole, then partitioned by deepspeed.initialize",
            e,
        )
        return None


def _groups_by_bytes(named: list[tuple[str, nn.Parameter]], budget: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    group, size = [], 0
    for name, p in named:
        group.append((name, p))
        size += getattr(p, "ds_numel", p.numel()) * p.element_size()
        if size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group
