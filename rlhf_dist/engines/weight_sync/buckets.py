"""Weight-sync payloads: named tensors flattened into a few large one-dtype buffers ("buckets").

Sending one bucket per call instead of one tensor per call is what keeps weight sync cheap (OpenRLHF #533: per-
parameter round trips took >40 % of step time). The object-store transport moves ``Bucket``s: ``bucket_to_numpy``
-> ``ray.put`` (numpy is zero-copy there, torch tensors are pickled) -> ``bucket_from_numpy``; vLLM's NCCL and IPC
engines pack buckets of their own.

Grouping rule: tensors are taken in order; each dtype has one open bucket; a tensor that would overflow its dtype's
open bucket closes it first; a tensor larger than ``bucket_bytes`` gets a bucket of its own; open buckets close at
the end in the order they were opened.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

# dtypes numpy cannot hold: carried as a same-width integer view and restored on the other side.
_NUMPY_CARRIER = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NUMPY_CARRIER[getattr(torch, _name)] = torch.uint8


@dataclass(frozen=True)
class BucketEntry:
    name: str  # HF parameter name
    shape: tuple[int, ...]
    offset: int  # in elements, into Bucket.flat
    numel: int


@dataclass
class Bucket:
    flat: torch.Tensor  # 1-D, one dtype
    entries: list[BucketEntry]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype


@dataclass
class NumpyBucket:
    """A Bucket as the Ray object store likes it: one numpy array (zero-copy on ``ray.get``) plus metadata."""

    flat: np.ndarray
    entries: list[BucketEntry]
    dtype: str  # the torch dtype name, e.g. "bfloat16" (flat may be an integer view of it)


class _Grouper:
    """The grouping rule; fed (key, nbytes, dtype) one at a time, returns the groups it closes."""

    def __init__(self, bucket_bytes: int) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.open: dict[torch.dtype, tuple[list, int]] = {}  # dtype -> (items, bytes); insertion order = opening order

    def add(self, item: object, nbytes: int, dtype: torch.dtype) -> list[list]:
        closed = []
        if nbytes > self.bucket_bytes:
            return [[item]]  # alone; the dtype's open bucket stays open
        items, size = self.open.get(dtype, ([], 0))
        if items and size + nbytes > self.bucket_bytes:
            closed.append(items)
            del self.open[dtype]
            items, size = [], 0
        items.append(item)
        self.open[dtype] = (items, size + nbytes)
        return closed

    def finish(self) -> list[list]:
        closed = [items for items, _ in self.open.values()]
        self.open.clear()
        return closed


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Stream named tensors into buckets of at most ``bucket_bytes`` (one oversized tensor may exceed it).

    Holds at most one open bucket's worth of tensor references per dtype; each bucket costs one copy (the cat).
    """
    grouper = _Grouper(bucket_bytes)
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        for group in grouper.add((name, tensor), nbytes, tensor.dtype):
            yield _make_bucket(group)
    for group in grouper.finish():
        yield _make_bucket(group)


def _make_bucket(group: list[tuple[str, torch.Tensor]]) -> Bucket:
    entries, offset = [], 0
    for name, t in group:
        entries.append(BucketEntry(name, tuple(t.shape), offset, t.numel()))
        offset += t.numel()
    flat = torch.cat([t.detach().reshape(-1) for _, t in group])
    return Bucket(flat, entries)


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view into bucket.flat with the entry's shape). Views: copy them if the bucket buffer is reused."""
    for e in bucket.entries:
        yield e.name, bucket.flat[e.offset : e.offset + e.numel].view(e.shape)


def bucket_to_numpy(bucket: Bucket) -> NumpyBucket:
    """Zero-copy for a CPU bucket (one device-to-host copy otherwise)."""
    flat = bucket.flat.detach().cpu()
    carrier = _NUMPY_CARRIER.get(flat.dtype)
    array = (flat.view(carrier) if carrier is not None else flat).numpy()
    return NumpyBucket(array, list(bucket.entries), str(bucket.flat.dtype).removeprefix("torch."))


def bucket_from_numpy(payload: NumpyBucket) -> Bucket:
    """Zero-copy back to a torch Bucket. Arrays from ``ray.get`` are read-only: treat the tensors as read-only."""
    dtype = getattr(torch, payload.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bucket_from_numpy: unknown torch dtype {payload.dtype!r}")
    with warnings.catch_warnings():
        # torch warns on read-only arrays; weights are only read (copied into the model) on this side.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(payload.flat)
    if dtype in _NUMPY_CARRIER:
        flat = flat.view(dtype)
    if flat.dtype != dtype:
        raise ValueError(f"bucket_from_numpy: array of {payload.flat.dtype} does not carry torch.{payload.dtype}")
    return Bucket(flat, list(payload.entries))
