"""What every role does when it starts: one seed, a bounded thread count, and the tensor edge of Arrow batches."""
from __future__ import annotations

import importlib
import os
import random
from typing import Callable

import numpy as np
import torch


def setup_process(seed: int, num_threads: float | int | None) -> None:
    """Seed every generator this process uses; cap torch threads at the CPUs the actor was given."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A stable seed from (run seed, iteration, rank, ...): Python's hash() of ints is stable, but spell it out."""
    s = 0x9E3779B1
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return s


def device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return torch.device("cuda", local)
    return torch.device("cpu")


def import_function(spec: str) -> Callable:
    """``module:function`` -> the function, with an error that says which half is wrong."""
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"reward.function {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AttributeError(f"reward.function {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn
