"""What every role does when it starts: one seed, a bounded thread count, the device."""

from __future__ import annotations

import os
import random

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
