"""Training engines on CPU with real DeepSpeed (ZeRO 0/2/3, gloo) and plain torch, on a tiny Llama.

The first DeepSpeed use on a machine compiles its shm comm op (~60-80 s, cached afterwards); warm, the module runs
in ~20 s, the two-process test included.
"""

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf_dist.comm.process_group import find_free_port, init_process_group, node_ip
from rlhf_dist.engines.training import TrainOptions, make_train_engine
from rlhf_dist.engines.training.base import atomic_write_dir, lr_factor
from rlhf_dist.engines.training.deepspeed_engine import build_ds_config

VOCAB = 64
ENGINES = [("torch", 0), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch(seed: int, rows: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def options(stage: int, **kw) -> TrainOptions:
    kw = {"lr": 1e-2, "dtype": "float32", "max_grad_norm": 1.0, "weight_decay": 0.1, **kw}
    return TrainOptions(zero_stage=stage, **kw)


def train_step(engine, ids: torch.Tensor) -> tuple[float, dict]:
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    return float(out.loss), engine.step()


@pytest.fixture(scope="module", autouse=True)
def local_group():
    init_process_group(0, 1)  # one rank; every single-process engine below shares it


@pytest.mark.parametrize("kind,stage", ENGINES)
def test_loss_decreases(kind, stage):
    engine = make_train_engine(kind, tiny_llama(), options(stage))
    ids = batch(1)
    losses = []
    for _ in range(5):
        loss, stats = train_step(engine, ids)
        losses.append(loss)
        assert stats["stepped"] and stats["lr"] == pytest.approx(1e-2)
        assert stats["grad_norm"] > 0
    assert engine.global_steps == 5
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_first_step_matches_torch_engine(stage):
    """Same seed, data, AdamW and clipping: DeepSpeed's update equals plain torch's."""
    ids = batch(1)
    results = {}
    for kind in ("torch", "deepspeed"):
        engine = make_train_engine(kind, tiny_llama(), options(stage, lr=1e-3, max_grad_norm=0.5))
        _, stats = train_step(engine, ids)
        results[kind] = (dict(engine.named_full_parameters()), stats["grad_norm"])
    (ref, ref_norm), (got, got_norm) = results["torch"], results["deepspeed"]
    assert got_norm == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > 0.5  # so clipping was active
    before = dict(tiny_llama().named_parameters())
    for name in ref:
        assert not torch.equal(ref[name], before[name]), name  # it moved
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)


def test_zero3_full_parameters_have_original_shapes():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine = make_train_engine("deepspeed", model, options(3))
    local = dict(engine.module.named_parameters())
    assert any(p.numel() != original[n].numel() for n, p in local.items())  # really partitioned
    full = dict(engine.named_full_parameters())
    assert {n: tuple(t.shape) for n, t in full.items()} == {n: tuple(t.shape) for n, t in original.items()}
    assert all(t.device.type == "cpu" for t in full.values())
    for name, t in full.items():
        assert torch.equal(t, original[name]), name  # untrained: gathered values are the originals
    assert engine.full_parameter_shapes() == {n: (t.shape, t.dtype) for n, t in original.items()}
    # Still partitioned afterwards, and the copies are not views of the gather buffers.
    assert {n: p.numel() for n, p in engine.module.named_parameters()} == {n: p.numel() for n, p in local.items()}


def test_zero3_from_factory():
    """A factory builds the model (HF-partitioned at load when accelerate is installed); either way the engine ends
    up partitioned with HF's initialisation intact."""
    engine = make_train_engine("deepspeed", tiny_llama, options(3))
    assert all(p.numel() == 0 for p in engine.module.parameters())  # one rank: all data lives in the ZeRO shards
    full = dict(engine.named_full_parameters())
    for name, t in tiny_llama().state_dict().items():
        assert torch.equal(full[name], t), name


@pytest.mark.parametrize("kind,stage", [("deepspeed", 3), ("torch", 0)])
def test_save_hf_then_from_pretrained_gives_identical_logits(kind, stage, tmp_path):
    engine = make_train_engine(kind, tiny_llama(), options(stage))
    ids = batch(1)
    train_step(engine, ids)
    out_dir = tmp_path / "hf"
    engine.save_hf(out_dir)
    engine.save_hf(out_dir)  # overwriting an existing save is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dirs left behind

    engine.eval()
    with torch.no_grad():
        expected = engine(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind,stage", [("deepspeed", 2), ("deepspeed", 3), ("torch", 0)])
def test_checkpoint_resume_continues_identically(kind, stage, tmp_path):
    opts = options(stage, lr_warmup_steps=3)  # the LR schedule position must survive too
    engine = make_train_engine(kind, tiny_llama(), opts)
    ids_a, ids_b = batch(1), batch(2)
    train_step(engine, ids_a)
    engine.save_checkpoint(tmp_path / "ckpt", client_state={"iteration": 7})
    _, stats_then = train_step(engine, ids_b)
    then = dict(engine.named_full_parameters())

    fresh = make_train_engine(kind, tiny_llama(seed=1), opts)  # different start: everything must come from disk
    assert fresh.load_checkpoint(tmp_path / "ckpt") == {"iteration": 7}
    _, stats_now = train_step(fresh, ids_b)
    now = dict(fresh.named_full_parameters())
    assert stats_now["lr"] == stats_then["lr"] == pytest.approx(1e-2 * 2 / 3)
    for name in then:
        torch.testing.assert_close(now[name], then[name], atol=0, rtol=0)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    engine = make_train_engine("torch", tiny_llama(), options(0))
    with pytest.raises(FileNotFoundError, match="torch_engine.pt"):
        engine.load_checkpoint(tmp_path)


@pytest.mark.parametrize("kind,stage", [("torch", 0), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)])
@pytest.mark.parametrize("step_every_backward", [True, False])
def test_gradient_accumulation_and_warmup(kind, stage, step_every_backward):
    """Two half batches accumulated == one step on the whole batch (equal token counts), whether step() follows
    every backward or only the last; the LR warms up linearly."""
    ids = batch(3, rows=4)
    whole = make_train_engine("torch", tiny_llama(), options(0, lr=1e-3, lr_warmup_steps=4))
    _, w = train_step(whole, ids)
    halves = make_train_engine(kind, tiny_llama(), options(stage, lr=1e-3, lr_warmup_steps=4, grad_accum_steps=2))
    halves.backward(halves(input_ids=ids[:2], labels=ids[:2]).loss)
    if step_every_backward:
        assert not halves.step()["stepped"]
    halves.backward(halves(input_ids=ids[2:], labels=ids[2:]).loss)
    second = halves.step()
    assert second["stepped"] and halves.global_steps == 1
    assert not halves.step()["stepped"]  # a stray step() changes nothing
    assert second["lr"] == w["lr"] == pytest.approx(1e-3 / 4)
    assert second["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    a, b = dict(whole.named_full_parameters()), dict(halves.named_full_parameters())
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    _, stats = train_step(halves, ids[:2])  # next accumulation: first half, no step yet
    assert not stats["stepped"] and stats["lr"] == pytest.approx(2e-3 / 4)
    halves.backward(halves(input_ids=ids[2:], labels=ids[2:]).loss)
    with pytest.raises(RuntimeError, match="3 backwards without step"):
        halves.backward(halves(input_ids=ids[2:], labels=ids[2:]).loss)


def test_bfloat16_trains_under_zero2():
    engine = make_train_engine("deepspeed", tiny_llama(), options(2, dtype="bfloat16"))
    ids = batch(1)
    losses = [train_step(engine, ids)[0] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.3
    assert {t.dtype for _, t in engine.named_full_parameters()} == {torch.bfloat16}


def test_options_and_config_errors():
    with pytest.raises(ValueError, match="zero_stage=4"):
        TrainOptions(zero_stage=4)
    with pytest.raises(ValueError, match="offload"):
        TrainOptions(zero_stage=0, offload=True)
    with pytest.raises(ValueError, match="total_steps"):
        TrainOptions(lr_schedule="cosine", total_steps=0)
    with pytest.raises(ValueError, match="kind='jax'"):
        make_train_engine("jax", tiny_llama(), options(0))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float16"):
            make_train_engine("torch", tiny_llama(), options(0, dtype="float16"))
    opts = TrainOptions(lr_warmup_steps=2, lr_schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    assert [round(lr_factor(opts, s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1]


def test_ds_config_translation():
    opts = TrainOptions(zero_stage=3, offload=True, grad_accum_steps=4, micro_batch_size=2, max_grad_norm=0.7)
    gpu = build_ds_config(opts, world_size=8, on_gpu=True)
    assert gpu["train_batch_size"] == 64 and gpu["gradient_accumulation_steps"] == 4
    assert gpu["gradient_clipping"] == 0.7 and gpu["bf16"] == {"enabled": True}
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu["optimizer"]["type"] == "AdamW"  # DeepSpeed's own: offload needs DeepSpeedCPUAdam
    assert "torch_adam" not in gpu["optimizer"]["params"]
    cpu = build_ds_config(opts, world_size=1, on_gpu=False)
    assert "optimizer" not in cpu and "offload_optimizer" not in cpu["zero_optimization"]


def test_gpu_optimizer_needs_no_jit_build():
    """Without offload DeepSpeed must pick torch's AdamW, not FusedAdam (a JIT build with nvcc on first use)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    params = dict(build_ds_config(TrainOptions(zero_stage=2), world_size=1, on_gpu=True)["optimizer"]["params"])
    # the method DeepSpeed calls with the config's params; with torch_adam it returns before looking at `self`
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(None, params, True)
    assert cls is torch.optim.AdamW and "torch_adam" not in params
    adamw = cls([torch.nn.Parameter(torch.ones(2))], **params, **kwargs)
    assert adamw.defaults["lr"] == TrainOptions(zero_stage=2).lr


def test_process_group_is_idempotent_and_checks_its_arguments():
    import torch.distributed as dist

    assert init_process_group(0, 1) == "gloo" and dist.get_world_size() == 1  # again: no-op
    with pytest.raises(RuntimeError, match="already joined a group as rank 0 of 1"):
        init_process_group(1, 2, "127.0.0.1", find_free_port())
    with pytest.raises(ValueError, match="rank < world_size"):
        init_process_group(2, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl"):
            init_process_group(0, 1, backend="nccl")
    assert isinstance(node_ip(), str) and 1 <= find_free_port() < 65536


def test_deepspeed_comm_builds_no_shm_inference_kernel():
    """The kernel serves only DeepSpeed's inference all-reduce; building it costs a C++ compile per checkout."""
    import deepspeed.comm as ds_comm
    from deepspeed.comm import comm as ds_comm_impl

    assert ds_comm.is_initialized() and ds_comm_impl.cdb.shm_comm_op is None
    total = torch.ones(3)
    ds_comm.all_reduce(total)  # through the process group
    assert total.tolist() == [1.0, 1.0, 1.0]


def test_atomic_write_dir_leaves_nothing_on_failure(tmp_path):
    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []


# ---- two processes: ZeRO-3 (and the torch engine) over gloo --------------------------------------------------------
TWO_RANK_CASES = {"zero3": ("deepspeed", 3, 1), "torch": ("torch", 0, 1), "zero2_accum2": ("deepspeed", 2, 2)}


def _rank_batches(rank: int, accum: int) -> list[torch.Tensor]:
    return [batch(10 + accum * rank + i) for i in range(accum)]  # every rank and micro-batch its own data


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    init_process_group(rank, 2, "127.0.0.1", port, backend="gloo", timeout_s=120)
    result = {}
    for case, (kind, stage, accum) in TWO_RANK_CASES.items():
        engine = make_train_engine(
            kind, tiny_llama(), options(stage, lr=1e-3, grad_accum_steps=accum), rank=rank, world_size=2
        )
        for ids in _rank_batches(rank, accum):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
        stats = engine.step()  # once per accumulation
        result[case] = {
            "stats": stats,
            "full": dict(engine.named_full_parameters(rank0_only=False)),
            "shard_numel": sum(p.numel() for p in engine.module.parameters()),
        }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(fn, nprocs: int, args: tuple, timeout_s: float) -> None:
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} ranks did not finish in {timeout_s} s")


def test_two_ranks_zero3_average_gradients(tmp_path):
    _spawn(_two_rank_worker, 2, (find_free_port(), str(tmp_path)), timeout_s=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    full_numel = sum(t.numel() for t in tiny_llama().parameters())
    assert ranks[0]["zero3"]["shard_numel"] < full_numel  # ZeRO-3 really sharded across the two ranks

    for case, (_, _, accum) in TWO_RANK_CASES.items():
        # Reference: one process accumulating both ranks' micro-batches (equal token counts: same mean loss).
        everything = _rank_batches(0, accum) + _rank_batches(1, accum)
        ref_engine = make_train_engine("torch", tiny_llama(), options(0, lr=1e-3, grad_accum_steps=2 * accum))
        for ids in everything:
            _, ref_stats = train_step(ref_engine, ids)
        ref = dict(ref_engine.named_full_parameters())
        rank0_alone = make_train_engine("torch", tiny_llama(), options(0, lr=1e-3, grad_accum_steps=accum))
        for ids in _rank_batches(0, accum):
            train_step(rank0_alone, ids)
        unaveraged = dict(rank0_alone.named_full_parameters())

        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["stats"]["stepped"] and r1["stats"]["stepped"], case
        assert r0["stats"]["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5), case
        assert r1["stats"]["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5), case
        for name in ref:
            torch.testing.assert_close(r0["full"][name], r1["full"][name], atol=0, rtol=0)  # ranks agree
            torch.testing.assert_close(r0["full"][name], ref[name], atol=1e-5, rtol=0)  # grads were averaged
        assert max((r0["full"][n] - unaveraged[n]).abs().max() for n in ref) > 1e-4, case  # rank 1's data mattered
