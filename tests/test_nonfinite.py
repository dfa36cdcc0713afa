"""NaN and inf in rewards, advantages, losses and gradients: stop with one line naming the source, or (on request)
skip the samples and steps and count them. And checkpoints that could run code on loading are refused."""

import math
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_training_engine import tiny_llama

from rlhf_dist.algo import NonFiniteError, first_and_count, nonfinite_rows, whole_groups, zero_rows
from rlhf_dist.config.schema import AlgoConfig
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import add_column, make_batch
from rlhf_dist.trainers.experience import compute_advantages

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------------------------------------
# the pure helpers


def test_nonfinite_rows_reads_only_real_tokens():
    x = torch.tensor([[1.0, NAN, 0.0], [INF, 2.0, 3.0], [1.0, 2.0, NAN], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]])
    assert nonfinite_rows(x, mask).tolist() == [True, False, False, False]  # inf and NaN on padding do not count
    assert nonfinite_rows(x).tolist() == [True, True, True, False]
    assert nonfinite_rows(torch.tensor([0.0, -INF, 1.0])).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="takes no mask"):
        nonfinite_rows(torch.zeros(3), mask)


def test_first_and_count_and_zero_rows():
    assert first_and_count(torch.tensor([False, True, False, True])) == (1, 2)
    assert first_and_count(torch.tensor([False, False])) == (-1, 0)
    x = torch.tensor([[NAN, 1.0], [2.0, 3.0]])
    assert zero_rows(x, torch.tensor([True, False])).tolist() == [[0.0, 0.0], [2.0, 3.0]]  # NaN * 0 would stay NaN
    assert zero_rows(torch.tensor([INF, 5.0]), torch.tensor([True, False])).tolist() == [0.0, 5.0]


def test_whole_groups_drops_groups_left_without_siblings():
    keep = torch.tensor([True, False, True, True, True, False, True])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert whole_groups(keep, groups, min_kept=2).tolist() == [False, False, True, True, False, False, False]
    assert whole_groups(keep, groups, min_kept=1).tolist() == keep.tolist()


# ---------------------------------------------------------------------------------------------------------------
# the driver: advantages


def experience(rewards, values=None, groups=None, lengths=(3, 2, 4, 1, 2)) -> pa.RecordBatch:
    """A scored batch; log-probs with old == ref (zero KL) unless a test changes them."""
    rng = np.random.default_rng(0)
    n = len(rewards)
    lengths = list(lengths)[:n]
    lp = [(-rng.random(k)).astype(np.float32) for k in lengths]
    cols = {
        S.SAMPLE_ID: np.arange(100, 100 + n),
        S.GROUP_ID: np.asarray(groups if groups is not None else range(n)),
        S.RESPONSE_IDS: [list(range(5, 5 + k)) for k in lengths],
        S.OLD_LOGPROBS: lp,
        S.REF_LOGPROBS: [v.copy() for v in lp],
        S.REWARD: np.asarray(rewards, np.float32),
        S.POLICY_VERSION: np.full(n, 3),
    }
    if values is not None:
        cols[S.VALUES] = values
    return make_batch(cols)


def column(batch: pa.RecordBatch, name: str) -> list[list[float]]:
    return batch.column(name).to_pylist()


def test_grpo_skip_drops_a_nan_reward_from_its_group_baseline():
    """Hand-computed: group 0 keeps scores 1 and 3 (mean 2, unbiased std sqrt 2), group 1 has 2 and 4."""
    batch = experience([1.0, NAN, 3.0, 2.0, 4.0], groups=[0, 0, 0, 1, 1])
    algo = AlgoConfig(estimator="grpo", normalize_advantages=False)
    out, stats = compute_advantages(batch, algo, kl_coef=0.1, on_nonfinite="skip")
    a = 1 / (math.sqrt(2) + 1e-6)
    adv = column(out, S.ADVANTAGES)
    np.testing.assert_allclose(adv[0], [-a] * 3, rtol=1e-6)
    assert all(math.isnan(v) for v in adv[1])  # the mark the learners read as "do not train on this one"
    np.testing.assert_allclose(adv[2] + adv[3] + adv[4], [a] * 4 + [-a] + [a] * 2, rtol=1e-6)
    assert stats["nonfinite/skipped_samples"] == 1 and stats["kl"] == 0.0


@pytest.mark.parametrize("estimator", ["gae", "rloo", "reinforce_pp"])
def test_skip_equals_the_batch_without_the_bad_samples(estimator):
    """A second, simple implementation: compute on the batch with the bad rows taken out."""
    values = [[0.1] * 3, [0.2] * 2, [INF, 0.0, 0.0, 0.0], [0.4], [0.5] * 2] if estimator == "gae" else None
    groups = [0, 0, 1, 1, 1] if estimator == "rloo" else None
    rewards = [1.0, 2.0, 0.5, -1.0, INF] if estimator != "gae" else [1.0, 2.0, 0.5, -1.0, 3.0]
    batch = experience(rewards, values, groups)
    algo = AlgoConfig(estimator=estimator)
    out, stats = compute_advantages(batch, algo, kl_coef=0.1, on_nonfinite="skip")
    dropped = {"gae": [2], "rloo": [4], "reinforce_pp": [4]}[estimator]
    kept = [i for i in range(5) if i not in dropped]
    ref, ref_stats = compute_advantages(batch.take(pa.array(kept)), algo, kl_coef=0.1)
    got = column(out, S.ADVANTAGES)
    np.testing.assert_allclose(np.concatenate([got[i] for i in kept]), np.concatenate(column(ref, S.ADVANTAGES)), 1e-6)
    assert all(math.isnan(v) for i in dropped for v in got[i])
    assert stats == pytest.approx({**ref_stats, "nonfinite/skipped_samples": len(dropped)}, rel=1e-6, abs=1e-6)
    if estimator == "gae":
        returns = column(out, S.RETURNS)
        np.testing.assert_allclose(np.concatenate([returns[i] for i in kept]), np.concatenate(column(ref, S.RETURNS)))


def test_rloo_skip_drops_a_sibling_left_alone():
    batch = experience([1.0, NAN, 0.5, -1.0, 2.0], groups=[0, 0, 1, 1, 1])
    out, stats = compute_advantages(batch, AlgoConfig(estimator="rloo"), 0.0, on_nonfinite="skip")
    assert stats["nonfinite/skipped_samples"] == 2  # sample 0 has no sibling left to be its baseline
    assert [math.isnan(a[0]) for a in column(out, S.ADVANTAGES)] == [True, True, False, False, False]


def test_nothing_nonfinite_gives_the_same_advantages_in_both_modes():
    batch = experience([1.0, 2.0, 0.5, -1.0, 3.0], values=[[0.1] * 3, [0.2] * 2, [0.3] * 4, [0.4], [0.5] * 2])
    stop, stop_stats = compute_advantages(batch, AlgoConfig(), 0.05)
    skip, skip_stats = compute_advantages(batch, AlgoConfig(), 0.05, on_nonfinite="skip")
    assert stop.equals(skip)
    assert skip_stats == {**stop_stats, "nonfinite/skipped_samples": 0}


@pytest.mark.parametrize(
    "column_name,expected",
    [
        (S.REWARD, r"reward is nan for sample 101 \(row 1\) in iteration 7, 2 of 5 samples non-finite"),
        (S.VALUES, r"values is inf for sample 102 \(row 2\) in iteration 7, 1 of 5"),
        (S.REF_LOGPROBS, r"ref_logprobs is -inf for sample 100 \(row 0\) in iteration 7, 1 of 5"),
    ],
)
def test_stop_names_the_quantity_the_sample_and_the_count(column_name, expected):
    rewards = [1.0, NAN, 0.5, NAN, 3.0] if column_name == S.REWARD else [1.0] * 5
    values = [[0.1] * 3, [0.2] * 2, [0.3, INF, 0.3, 0.3], [0.4], [0.5] * 2]
    if column_name != S.VALUES:
        values[2][1] = 0.3
    batch = experience(rewards, values)
    if column_name == S.REF_LOGPROBS:
        ref = column(batch, S.REF_LOGPROBS)
        ref[0][2] = -INF
        batch = add_column(batch, S.REF_LOGPROBS, pa.array(ref, S.PER_TOKEN))
    with pytest.raises(NonFiniteError, match=expected) as err:
        compute_advantages(batch, AlgoConfig(), 0.05, iteration=7)
    assert "\n" not in str(err.value) and "train.on_nonfinite=skip" in str(err.value)


def test_stop_catches_an_overflow_in_the_advantages_themselves():
    batch = experience([3e38, 3e38, 1.0, 1.0, 1.0], groups=[0, 0, 1, 1, 1])  # finite rewards, inf group sum
    with pytest.raises(NonFiniteError, match=r"advantages is (nan|inf|-inf) for sample 100 .* 2 of 5"):
        compute_advantages(batch, AlgoConfig(estimator="rloo", normalize_advantages=False), 0.0)
    out, stats = compute_advantages(
        batch, AlgoConfig(estimator="rloo", normalize_advantages=False), 0.0, on_nonfinite="skip"
    )
    assert stats["nonfinite/skipped_samples"] == 2
    assert column(out, S.ADVANTAGES)[2:] == [[0.0] * 4, [0.0], [0.0] * 2]  # 1 - mean(1, 1)
    assert stats["advantages_mean"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# the reward role


def inf_for_the_second(prompts: list[str], responses: list[str]) -> list[float]:
    return [INF if i == 1 else 0.5 for i in range(len(responses))]


def texts(n: int = 4) -> pa.RecordBatch:
    return make_batch(
        {
            S.SAMPLE_ID: np.arange(n),
            S.PROMPT_TEXT: [f"prompt {i}" for i in range(n)],
            S.RESPONSE_TEXT: [f"response {i}" for i in range(n)],
        }
    )


def test_reward_skip_lets_the_sample_through_as_nan_even_when_clipped(tiny_cfg):
    from rlhf_dist.workers.reward import NonFiniteRewardError, RewardWorker

    fn = "reward.function=test_nonfinite:inf_for_the_second"
    skip = RewardWorker(tiny_cfg(fn, "reward.clip=1.0", "train.on_nonfinite=skip")).score(texts())
    reward = skip.column(S.REWARD).to_numpy()
    assert np.isnan(reward[1]) and reward[[0, 2, 3]].tolist() == [0.5] * 3  # the clip would have made inf a 1.0
    with pytest.raises(NonFiniteRewardError, match=r"returned inf for sample 1 .*1 of 4"):
        RewardWorker(tiny_cfg(fn, "reward.clip=1.0")).score(texts())
    assert issubclass(NonFiniteRewardError, NonFiniteError)


# ---------------------------------------------------------------------------------------------------------------
# the engines: a step with a non-finite gradient norm is not applied, on every backend


@pytest.fixture(scope="module")
def gloo():
    from rlhf_dist.comm.process_group import init_process_group

    init_process_group(0, 1)


def step(engine, ids, poison: bool = False) -> dict:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss * NAN if poison else loss)
    return engine.step()


@pytest.mark.parametrize(
    "kind,stage,dtype",
    [("torch", 0, "float32"), ("torch", 0, "bfloat16"), ("deepspeed", 0, "float32"), ("deepspeed", 0, "bfloat16")]
    + [("deepspeed", 2, "float32"), ("deepspeed", 2, "bfloat16"), ("deepspeed", 3, "float32")],
)
def test_a_nan_gradient_step_is_counted_and_not_applied(gloo, kind, stage, dtype):
    from rlhf_dist.engines.training import TrainOptions, make_train_engine

    opts = TrainOptions(lr=1e-2, zero_stage=stage, dtype=dtype, lr_warmup_steps=4)
    engine = make_train_engine(kind, tiny_llama(), opts)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    first = step(engine, ids)
    before = {n: p.clone() for n, p in engine.named_full_parameters()}
    bad = step(engine, ids, poison=True)
    assert not bad["stepped"] and not math.isfinite(bad["grad_norm"])
    assert engine.skipped_steps == 1 and engine.global_steps == 1
    after = dict(engine.named_full_parameters())
    for name, p in before.items():
        assert torch.equal(after[name], p), name
    if kind == "deepspeed":
        assert engine._engine.skipped_steps == 1  # DeepSpeed's own counter, whoever skipped
        if (stage, dtype) != (0, "float32"):  # DeepSpeed skipped by itself (we skip the other case before its step)
            assert not engine._engine.was_step_applied()
    good = step(engine, ids)  # the next step applies, at the LR the skipped one would have used
    assert good["stepped"] and good["lr"] == bad["lr"] == pytest.approx(2 * first["lr"])
    assert all(torch.isfinite(p).all() for _, p in engine.named_full_parameters())


def test_deepspeed_stage0_float32_would_apply_a_nan_step(gloo):
    """Why DeepSpeedTrainEngine.step skips that case itself: DeepSpeed steps the bare torch optimizer there. If this
    fails, DeepSpeed now skips on its own and our check is redundant (not wrong). bf16 skips by its default."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    from rlhf_dist.engines.training import TrainOptions, make_train_engine

    assert DeepSpeedBF16Config().check_grad_overflow is True  # what build_ds_config's bf16 section relies on
    engine = make_train_engine("deepspeed", tiny_llama(), TrainOptions(zero_stage=0, dtype="float32"))
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    engine._engine.backward(engine(input_ids=ids, labels=ids).loss * NAN)
    engine._engine.step()
    assert engine._engine.was_step_applied() and engine._engine.skipped_steps == 0
    assert any(torch.isnan(p).any() for p in engine.module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# the learners


@pytest.fixture
def policy_cfg(tiny_cfg):
    def make(*overrides):
        return tiny_cfg(
            "train.engine=torch",
            "train.prompts_per_iteration=8",
            "train.mini_batches=2",
            "train.ppo_epochs=2",
            *overrides,
        )

    return make


def learner_batch(n: int = 8, advantages=None) -> pa.RecordBatch:
    rng = np.random.default_rng(1)
    lengths = [3, 4, 2, 4, 3, 1, 4, 2][:n]
    lp = [(-rng.random(k) - 2.0).astype(np.float32) for k in lengths]
    adv = advantages or [list(rng.standard_normal(k).astype(np.float32)) for k in lengths]
    return make_batch(
        {
            S.SAMPLE_ID: np.arange(200, 200 + n),
            S.PROMPT_IDS: [[10 + i, 11, 12] for i in range(n)],
            S.RESPONSE_IDS: [list(rng.integers(20, 200, k)) for k in lengths],
            S.OLD_LOGPROBS: lp,
            S.REF_LOGPROBS: [v.copy() for v in lp],
            S.ROLLOUT_LOGPROBS: [v.copy() for v in lp],
            S.ADVANTAGES: adv,
            S.VALUES: [np.zeros(k, np.float32) for k in lengths],
            S.RETURNS: adv,
            S.POLICY_VERSION: np.full(n, 4),
        }
    )


def started(worker_cls, cfg):
    from rlhf_dist.comm.process_group import find_free_port

    worker = worker_cls(cfg, 0, 1)
    worker.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    return worker


def weights(worker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in worker.engine.module.named_parameters()}


def with_row(batch: pa.RecordBatch, name: str, row: int, value: float) -> pa.RecordBatch:
    values = column(batch, name)
    values[row] = [value] * len(values[row])
    return add_column(batch, name, pa.array(values, S.PER_TOKEN))


@pytest.mark.parametrize("role", ["policy", "critic"])
def test_learner_skip_trains_as_if_the_marked_sample_were_absent(policy_cfg, role):
    """Two batches that differ only in what the marked sample holds (NaN advantages/returns as the driver marks it,
    or NaN old log-probs/values plus large finite targets) train to the same weights: it takes no part."""
    from rlhf_dist.workers.critic import CriticWorker
    from rlhf_dist.workers.policy import PolicyWorker

    cls, mark, other = {
        "policy": (PolicyWorker, S.ADVANTAGES, S.OLD_LOGPROBS),
        "critic": (CriticWorker, S.RETURNS, S.VALUES),
    }[role]
    batch = learner_batch()
    a = with_row(batch, mark, 2, NAN)
    b = with_row(with_row(batch, mark, 2, 1e3), other, 2, NAN)
    results = []
    for marked in (a, b):
        worker = started(cls, policy_cfg("train.on_nonfinite=skip"))
        start = weights(worker)
        stats = worker.train(marked)
        results.append(weights(worker))
        assert stats[f"{role}/skipped_steps"] == 0 and stats[f"{role}/nonfinite_losses"] == 0
        assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(results[0][n], start[n]) for n in start)  # it trained
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=0, rtol=0)


def test_learner_stop_names_the_input_the_sample_and_the_rank(policy_cfg):
    from rlhf_dist.workers.policy import PolicyWorker

    worker = started(PolicyWorker, policy_cfg())
    batch = with_row(with_row(learner_batch(), S.ADVANTAGES, 1, NAN), S.ADVANTAGES, 3, INF)
    start = weights(worker)
    with pytest.raises(NonFiniteError) as err:
        worker.train(batch)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("policy learner rank 0, samples of policy version 4: advantages is nan for sample 201")
    assert "2 non-finite" in msg  # both bad rows sit in the first micro-batch (rows 0-3)
    assert all(torch.equal(p, start[n]) for n, p in weights(worker).items())


def poisoned(worker) -> None:
    """A NaN in every weight matrix: every forward, loss and gradient from now on is NaN."""
    with torch.no_grad():
        for p in worker.engine.module.parameters():
            p.view(-1)[0] = NAN


def test_learner_skip_counts_nan_losses_and_skipped_steps_then_stops_after_k_in_a_row(policy_cfg):
    from rlhf_dist.workers.policy import PolicyWorker

    worker = started(PolicyWorker, policy_cfg("train.on_nonfinite=skip", "train.max_skipped_steps=6"))
    batch = learner_batch()
    worker.train(batch)  # a good iteration first
    poisoned(worker)
    start = weights(worker)
    stats = worker.train(batch)  # 4 optimizer steps (2 epochs x 2 mini-batches), all skipped
    assert stats["policy/skipped_steps"] == 4 and stats["policy/nonfinite_losses"] == 4
    assert stats["policy/stepped"] == 0.0
    for name, p in weights(worker).items():
        torch.testing.assert_close(p, start[name], atol=0, rtol=0, equal_nan=True)
    with pytest.raises(NonFiniteError) as err:
        worker.train(batch)  # steps 5 and 6 in a row
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("policy learner rank 0, samples of policy version 4: 6 optimizer steps in a row were skipped")
    assert "optimizer step 2 of this train call (epoch 1/2, mini-batch 2/2)" in msg
    assert "train.max_skipped_steps=6" in msg


def test_learner_stop_names_a_nan_loss_before_any_update(policy_cfg):
    from rlhf_dist.workers.critic import CriticWorker

    worker = started(CriticWorker, policy_cfg())
    poisoned(worker)
    with pytest.raises(NonFiniteError) as err:
        worker.train(learner_batch())
    assert str(err.value).startswith(
        "critic learner rank 0, samples of policy version 4: the loss is nan at micro-batch 1/1 of optimizer step 1 "
        "of this train call (epoch 1/2, mini-batch 1/2); no update was applied"
    )
    assert worker.engine.global_steps == 0 and worker.engine.skipped_steps == 0


def test_learner_stop_names_a_nan_gradient(policy_cfg, monkeypatch):
    """A finite loss whose gradient is not (an overflow in backward): the engine skips, the learner stops."""
    from rlhf_dist.workers.policy import PolicyWorker

    worker = started(PolicyWorker, policy_cfg())
    real_backward = worker.engine.backward

    def backward(loss):
        real_backward(loss)
        next(worker.engine.module.parameters()).grad.view(-1)[0] = INF

    monkeypatch.setattr(worker.engine, "backward", backward)
    with pytest.raises(
        NonFiniteError, match=r"^policy learner rank 0.*: the gradient norm is inf at optimizer step 1 "
    ):
        worker.train(learner_batch())
    assert worker.engine.skipped_steps == 1 and worker.engine.global_steps == 0


# ---------------------------------------------------------------------------------------------------------------
# checkpoints load as data, never as code


class RunsCode:
    """Unpickling this opens (creates) a file: any code could stand in its place."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(gloo, tmp_path):
    from rlhf_dist.engines.training import TrainOptions, make_train_engine
    from rlhf_dist.engines.training.torch_engine import CHECKPOINT_FILE

    engine = make_train_engine("torch", tiny_llama(), TrainOptions(lr=1e-2, dtype="float32"))
    engine.save_checkpoint(tmp_path / "ok", client_state={"torch_rng": torch.get_rng_state(), "iteration": 3})
    assert engine.load_checkpoint(tmp_path / "ok")["iteration"] == 3  # our own format loads as data
    state = torch.load(tmp_path / "ok" / CHECKPOINT_FILE, weights_only=True)
    marker = tmp_path / "code_ran"
    state["client_state"]["payload"] = RunsCode(str(marker))
    (tmp_path / "evil").mkdir()
    torch.save(state, tmp_path / "evil" / CHECKPOINT_FILE)

    with pytest.raises(pickle.UnpicklingError) as err:
        engine.load_checkpoint(tmp_path / "evil")
    msg = str(err.value)
    assert "\n" not in msg and "refusing to unpickle it" in msg and "io.open" in msg, msg
    assert not marker.exists()
    torch.load(tmp_path / "evil" / CHECKPOINT_FILE, weights_only=False)  # the payload is real: this runs it
    assert marker.exists()
    os.remove(marker)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_deepspeed_checkpoint_that_would_run_code_is_refused_before_deepspeed_reads_it(gloo, tmp_path, dtype):
    """DeepSpeed unpickles with weights_only=False and has no switch: our engine reads every file as data first."""
    from rlhf_dist.engines.training import TrainOptions, make_train_engine

    engine = make_train_engine("deepspeed", tiny_llama(), TrainOptions(lr=1e-2, zero_stage=2, dtype=dtype))
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    step(engine, ids)
    engine.save_checkpoint(tmp_path / "ok", client_state={"torch_rng": torch.get_rng_state(), "iteration": 3})
    assert engine.load_checkpoint(tmp_path / "ok")["iteration"] == 3  # DeepSpeed's own classes are let through
    (optim,) = (tmp_path / "ok").rglob("*optim_states.pt")
    state = torch.load(optim, weights_only=False)
    marker = tmp_path / "code_ran"
    state["payload"] = RunsCode(str(marker))
    torch.save(state, optim)

    with pytest.raises(pickle.UnpicklingError) as err:
        engine.load_checkpoint(tmp_path / "ok")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(optim)) and "it names io.open" in msg, msg
    assert not marker.exists()
