"""The part of the GPU transports that runs anywhere: receivers allocate from the plan what rank 0 will send."""
import torch

from rlhf_dist.engines.weight_sync.buckets import allocate_bucket, pack_buckets
from rlhf_dist.engines.weight_sync.senders import bucket_plan


def test_bucket_plan_matches_what_rank0_packs():
    torch.manual_seed(0)
    named = [("a", torch.randn(300)), ("b", torch.randn(10, 10)), ("c", torch.randn(700).bfloat16()),
             ("d", torch.randn(50)), ("e", torch.randn(2000))]
    shapes = {n: (t.shape, t.dtype) for n, t in named}
    plan = bucket_plan(shapes, bucket_bytes=1600)
    packed = list(pack_buckets(named, 1600))
    assert [[n for n, _, _ in group] for group in plan] == [[e.name for e in b.entries] for b in packed]
    for group, bucket in zip(plan, packed):
        # what a vLLM worker allocates from the plan has the sender's exact layout and size
        names = [n for n, _, _ in group]
        recv = allocate_bucket(names, {n: (tuple(s), getattr(torch, d)) for n, s, d in group})
        assert recv.flat.dtype == bucket.flat.dtype and recv.flat.numel() == bucket.flat.numel()
        assert [(e.name, tuple(e.shape), e.offset) for e in recv.entries] == \
               [(e.name, tuple(e.shape), e.offset) for e in bucket.entries]
