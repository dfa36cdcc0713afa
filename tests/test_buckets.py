"""Weight buckets: pack/unpack round trips, the grouping rule, numpy carriage, and plan == pack."""

import pickle

import numpy as np
import pytest
import torch

from rlhf_dist.engines.weight_sync.buckets import (
    Bucket,
    bucket_from_numpy,
    bucket_to_numpy,
    pack_buckets,
    unpack_bucket,
)


def named_mixed() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(4, 8, generator=g)),  # 128 B float32
        ("a.bias", torch.randn(8, generator=g).to(torch.bfloat16)),  # 16 B
        ("b.weight", torch.randn(3, 5, generator=g)),  # 60 B
        ("big.weight", torch.randn(10, 10, generator=g)),  # 400 B > bucket
        ("c.scale", torch.randn((), generator=g)),  # 0-d, 4 B
        ("d.weight", torch.randn(2, 6, generator=g).to(torch.bfloat16)),  # 24 B
        ("e.weight", torch.randn(5, 6, generator=g)),  # 120 B
        ("f.mask", torch.ones(3, dtype=torch.int64)),  # 24 B
    ]


def as_dict(pairs):
    return {n: t.clone() for n, t in pairs}


def test_round_trip_mixed_dtypes_and_oversized_tensor():
    named = named_mixed()
    buckets = list(pack_buckets(named, bucket_bytes=200))
    got = {}
    for b in buckets:
        assert b.flat.dim() == 1
        assert {b.flat.dtype} == {dict(named)[e.name].dtype for e in b.entries}  # dtypes never share
        assert b.nbytes == b.flat.numel() * b.flat.element_size()
        if len(b.entries) > 1:
            assert b.nbytes <= 200
        got.update(as_dict(unpack_bucket(b)))
    assert set(got) == {n for n, _ in named}
    for name, t in named:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t)


def test_exact_grouping_rule():
    """Worked out by hand from the rule in buckets.py (sizes in named_mixed's comments, 200 B buckets)."""
    named = named_mixed()
    names = [[e.name for e in b.entries] for b in pack_buckets(named, bucket_bytes=200)]
    assert names == [
        ["big.weight"],  # larger than a bucket: alone, emitted at once
        ["a.weight", "b.weight", "c.scale"],  # 128+60+4 = 192 B; e.weight (120 B) would overflow -> closes it
        ["a.bias", "d.weight"],  # open buckets close at the end in opening order: bf16 opened before
        ["e.weight"],  # float32's second bucket (opened after bf16's)
        ["f.mask"],
    ]


def test_unpack_gives_views_into_flat():
    (b,) = list(pack_buckets([("x", torch.arange(6.0).view(2, 3)), ("y", torch.ones(2))], bucket_bytes=1 << 20))
    views = dict(unpack_bucket(b))
    assert views["x"].data_ptr() == b.flat.data_ptr()
    assert views["y"].data_ptr() == b.flat.data_ptr() + 6 * 4
    assert [(e.offset, e.numel, e.shape) for e in b.entries] == [(0, 6, (2, 3)), (6, 2, (2,))]


def test_empty_input_and_bad_size():
    assert list(pack_buckets([], bucket_bytes=100)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(pack_buckets([("x", torch.ones(1))], bucket_bytes=0))


def test_non_contiguous_input():
    t = torch.arange(12.0).view(3, 4).t()  # transposed: not contiguous
    (b,) = list(pack_buckets([("t", t)], bucket_bytes=1 << 10))
    assert torch.equal(dict(unpack_bucket(b))["t"], t)


def test_numpy_round_trip_including_bfloat16():
    named = named_mixed()
    for b in pack_buckets(named, bucket_bytes=200):
        payload = bucket_to_numpy(b)
        assert isinstance(payload.flat, np.ndarray)
        if b.flat.dtype == torch.bfloat16:
            assert payload.flat.dtype == np.int16 and payload.dtype == "bfloat16"
        assert np.shares_memory(
            payload.flat, b.flat.numpy() if b.flat.dtype != torch.bfloat16 else b.flat.view(torch.int16).numpy()
        )  # zero-copy
        # What the object store does: serialise, and hand back a read-only array.
        restored = pickle.loads(pickle.dumps(payload))
        restored.flat.setflags(write=False)
        back = bucket_from_numpy(restored)
        assert isinstance(back, Bucket) and back.flat.dtype == b.flat.dtype
        assert torch.equal(back.flat, b.flat)
        assert back.entries == b.entries


def test_numpy_rejects_unknown_dtype():
    payload = bucket_to_numpy(next(pack_buckets([("x", torch.ones(2))], 64)))
    payload.dtype = "nonsense"
    with pytest.raises(ValueError, match="unknown torch dtype"):
        bucket_from_numpy(payload)
