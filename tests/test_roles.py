"""Each role driven in-process, without Ray: the same classes the actors wrap."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import merge_columns


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg("train.prompts_per_iteration=8", "train.engine=torch", "generation.max_new_tokens=8")


@pytest.fixture
def prompts(cfg):
    from rlhf_dist.trainers.ppo import prepare

    return prepare(cfg).next_batch()


@pytest.fixture
def rollout(cfg):
    from rlhf_dist.workers.rollout import RolloutWorker

    return RolloutWorker(cfg, rank=0)


def test_rollout_generates_arrow_with_aligned_logprobs(rollout, prompts):
    batch = rollout.generate(prompts, iteration=0)
    assert isinstance(batch, pa.RecordBatch) and len(batch) == len(prompts)
    assert batch.schema.field(S.RESPONSE_IDS).type == S.TOKENS
    assert batch.schema.field(S.ROLLOUT_LOGPROBS).type == S.PER_TOKEN
    lens = batch.column(S.RESPONSE_IDS).value_lengths().to_pylist()
    assert lens == batch.column(S.ROLLOUT_LOGPROBS).value_lengths().to_pylist()
    assert max(lens) <= 8 and sum(lens) > 0
    lp = np.concatenate(batch.column(S.ROLLOUT_LOGPROBS).to_pylist())
    assert np.all(lp <= 0)
    assert set(batch.column(S.POLICY_VERSION).to_pylist()) == {0}
    # same seed and iteration -> the same samples
    again = rollout.generate(prompts, iteration=0)
    assert again.column(S.RESPONSE_IDS).equals(batch.column(S.RESPONSE_IDS))


def test_a_failed_weight_update_is_not_announced_as_the_new_version(rollout):
    """The learner sends start, update and finish together (engines/weight_sync/client.py), so a finish can follow an
    update that raised: it refuses, and the engine keeps its version; the next complete update goes through."""
    from rlhf_dist.engines.weight_sync.buckets import bucket_to_numpy, pack_buckets

    weights = list(rollout.engine.named_parameters())
    rollout.start_weight_update()
    with pytest.raises(Exception):  # noqa: B017 (whatever a malformed payload raises)
        rollout.update_weights({"buckets": ["not a bucket"]})
    with pytest.raises(RuntimeError, match="the weight update to version 1 failed.*keeps version 0"):
        rollout.finish_weight_update(1)
    assert rollout.version == 0
    rollout.start_weight_update()
    rollout.update_weights({"buckets": [bucket_to_numpy(b) for b in pack_buckets(weights, 1 << 20)]})
    assert rollout.finish_weight_update(1) == 1 and rollout.version == 1


def test_reference_logprobs_match_rollout_engine(cfg, rollout, prompts):
    """The engine and a full forward pass agree on every sampled token: the basis of the stale-weight check."""
    from rlhf_dist.workers.reference import ReferenceWorker

    batch = rollout.generate(prompts, iteration=1)
    ref = ReferenceWorker(cfg).logprobs(batch)
    a = np.concatenate(ref.column(S.REF_LOGPROBS).to_pylist())
    b = np.concatenate(batch.column(S.ROLLOUT_LOGPROBS).to_pylist())
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_reward_function_and_gold(cfg, rollout, prompts):
    from rlhf_dist.data.synthetic import gold_reward, preference_reward
    from rlhf_dist.workers.reward import RewardWorker

    batch = rollout.generate(prompts, iteration=2)
    scored = RewardWorker(cfg).score(batch)
    p, r = batch.column(S.PROMPT_TEXT).to_pylist(), batch.column(S.RESPONSE_TEXT).to_pylist()
    np.testing.assert_allclose(scored.column(S.REWARD).to_numpy(), np.float32(preference_reward(p, r)), rtol=1e-6)
    np.testing.assert_allclose(
        scored.column(S.GOLD_REWARD).to_numpy(), [gold_reward(a, b) for a, b in zip(p, r)], rtol=1e-6
    )


def nan_for_the_third(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan") if i == 2 else 1.0 for i in range(len(responses))]


def test_a_nan_reward_stops_with_one_line_naming_its_source(tiny_cfg, rollout, prompts):
    """A NaN reward would make every optimizer step a skipped one and save the unchanged policy as a success."""
    from rlhf_dist.workers.reward import NonFiniteRewardError, RewardWorker

    batch = rollout.generate(prompts, iteration=1)
    reward = RewardWorker(tiny_cfg("reward.function=test_roles:nan_for_the_third"))
    expected = r"reward.function 'test_roles:nan_for_the_third' returned nan for sample 2 \(response .*\), 1 of 8"
    with pytest.raises(NonFiniteRewardError, match=expected) as err:
        reward.score(batch)
    assert "\n" not in str(err.value)


def test_policy_trains_and_rollout_receives_its_weights(cfg, rollout, prompts):
    from rlhf_dist.comm.process_group import find_free_port
    from rlhf_dist.trainers.experience import compute_advantages
    from rlhf_dist.workers.critic import CriticWorker
    from rlhf_dist.workers.policy import PolicyWorker
    from rlhf_dist.workers.reference import ReferenceWorker
    from rlhf_dist.workers.reward import RewardWorker

    policy, critic = PolicyWorker(cfg, 0, 1), CriticWorker(cfg, 0, 1)
    policy.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    critic.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    batch = rollout.generate(prompts, iteration=3)
    batch = merge_columns(
        batch,
        RewardWorker(cfg).score(batch),
        ReferenceWorker(cfg).logprobs(batch),
        policy.logprobs(batch),
        critic.values(batch),
    )
    batch, _ = compute_advantages(batch, cfg.algo, cfg.algo.kl_coef)
    before = {k: v.copy() for k, v in rollout.weights().items()}
    stats = policy.train(batch)
    critic_stats = critic.train(batch)
    assert np.isfinite(stats["policy/loss"]) and np.isfinite(critic_stats["critic/value_loss"])
    policy.init_weight_sync([rollout], "object_store", workers_per_engine=1, bucket_mb=1, timeout_s=60)
    assert policy.push_weights(version=1) == ([1], sum(p.numel() * 4 for p in policy.engine.module.parameters()))
    after = rollout.weights()
    learner = {n: p.detach().float().numpy() for n, p in policy.engine.module.named_parameters()}
    changed = [n for n in after if not np.array_equal(after[n], before[n])]
    assert changed, "training changed no weight that reached the rollout engine"
    for n, w in after.items():
        np.testing.assert_array_equal(w, learner[n])
    assert set(rollout.generate(prompts, iteration=4).column(S.POLICY_VERSION).to_pylist()) == {1}


def test_policy_learner_corrects_stale_samples(tiny_cfg, rollout, prompts):
    """Decoupled PPO in the learner: the rollout's log-probs are moved off the learner's (the proximal policy) by
    known ratios k = pi_prox / pi_behav of 1, 3, 0.25 by token position. At the step's start pi_theta = pi_prox, so the
    loss is -sum(w * A) / N with w = min(k, 2) (TIS) or k inside [0.5, 5], else 0 (IcePop)."""
    from rlhf_dist.comm.process_group import find_free_port
    from rlhf_dist.data.batch import add_column
    from rlhf_dist.workers.policy import PolicyWorker

    one_step = ("train.prompts_per_iteration=8", "train.engine=torch", "generation.max_new_tokens=8")
    one_step += ("train.ppo_epochs=1", "train.mini_batches=1")
    cfgs = {
        "none": tiny_cfg(*one_step),
        "tis": tiny_cfg(*one_step, "algo.off_policy=tis", "algo.tis_cap=2"),
        "icepop": tiny_cfg(*one_step, "algo.off_policy=icepop", "algo.icepop_low=0.5", "algo.icepop_high=5"),
    }
    policy = PolicyWorker(cfgs["none"], 0, 1)
    policy.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    samples = rollout.generate(prompts, iteration=5)
    ks = (1.0, 3.0, 0.25)

    def train(mode: str, k_of=lambda t: ks[t % 3]):
        policy.cfg = cfgs[mode]  # one learner for every mode; each call starts from a fresh proximal policy
        old = policy.logprobs(samples).column(S.OLD_LOGPROBS).to_pylist()
        adv = [[1.0 if i % 2 == 0 else -0.5] * len(row) for i, row in enumerate(old)]
        batch = samples
        for name, col in (
            (S.OLD_LOGPROBS, old),
            (S.REF_LOGPROBS, old),
            (S.ADVANTAGES, adv),
            (S.ROLLOUT_LOGPROBS, [[lp - np.log(k_of(t)) for t, lp in enumerate(row)] for row in old]),
        ):
            batch = add_column(batch, name, pa.array(col, S.PER_TOKEN))
        return policy.train(batch), adv

    def weight(mode: str, k: float) -> float:
        return 1.0 if mode == "none" else min(k, 2.0) if mode == "tis" else (k if 0.5 <= k <= 5.0 else 0.0)

    stats = {}
    for mode in cfgs:
        stats[mode], adv = train(mode)
        tokens = [(ks[t % 3], a) for row in adv for t, a in enumerate(row)]
        expected = -sum(weight(mode, k) * a for k, a in tokens) / len(tokens)
        assert stats[mode]["policy/loss"] == pytest.approx(expected, rel=1e-4), mode
    share = {k: sum(kt == k for kt, _ in tokens) / len(tokens) for k in ks}
    k3 = sum(share[k] * ((k - 1) - np.log(k)) for k in ks)
    assert set(stats["tis"]) - set(stats["none"]) == {
        "policy/is_clipped_frac",
        "policy/is_weight_mean",
        "policy/behav_kl",
    }
    assert set(stats["icepop"]) - set(stats["none"]) == {
        "policy/icepop_masked_frac",
        "policy/is_weight_mean",
        "policy/behav_kl",
    }
    assert set(stats["none"]) <= set(stats["tis"]) and set(stats["none"]) <= set(stats["icepop"])
    assert stats["tis"]["policy/is_clipped_frac"] == pytest.approx(share[3.0])
    assert stats["tis"]["policy/is_weight_mean"] == pytest.approx(share[1.0] + 2.0 * share[3.0] + 0.25 * share[0.25])
    assert stats["icepop"]["policy/icepop_masked_frac"] == pytest.approx(share[0.25])
    assert stats["icepop"]["policy/is_weight_mean"] == pytest.approx(share[1.0] + 3.0 * share[3.0], rel=1e-5)
    for mode in ("tis", "icepop"):
        assert stats[mode]["policy/behav_kl"] == pytest.approx(k3, rel=1e-4)
    # IcePop masking every token: no loss and not one nonzero gradient entry
    masked, _ = train("icepop", k_of=lambda t: 10.0)
    assert masked["policy/icepop_masked_frac"] == 1.0 and masked["policy/is_weight_mean"] == 0.0
    assert masked["policy/loss"] == 0.0 and masked["policy/grad_norm"] == 0.0


def test_policy_learner_takes_its_own_log_probs_as_old_at_one_on_policy_step(tiny_cfg, rollout, prompts):
    """train.recompute_old_logprobs=auto with one step on on-policy samples: the batch carries no old_logprobs and the
    learner takes its forward pass's, detached. That is the step an explicit column of its current log-probs gives
    (always): the same loss (ratio 1 on every token: -mean(A)), the same gradient, the same new weights."""
    from rlhf_dist.comm.process_group import find_free_port
    from rlhf_dist.data.batch import add_column
    from rlhf_dist.workers.policy import PolicyWorker

    one_step = ("train.prompts_per_iteration=8", "train.engine=torch", "generation.max_new_tokens=8")
    one_step += ("train.ppo_epochs=1", "train.mini_batches=1", "algo.kl_mode=loss", "algo.kl_estimator=k3")
    auto, always = tiny_cfg(*one_step), tiny_cfg(*one_step, "train.recompute_old_logprobs=always")
    assert auto.train.skips_old_logprobs(auto.algo) and not always.train.skips_old_logprobs(always.algo)
    samples = rollout.generate(prompts, iteration=6)
    lengths = samples.column(S.RESPONSE_IDS).value_lengths().to_pylist()
    adv = [[1.0 if i % 2 == 0 else -0.5] * n for i, n in enumerate(lengths)]
    ref = [[lp - 0.1 * (t % 2) for t, lp in enumerate(row)] for row in samples.column(S.ROLLOUT_LOGPROBS).to_pylist()]
    batch = add_column(samples, S.ADVANTAGES, pa.array(adv, S.PER_TOKEN))
    batch = add_column(batch, S.REF_LOGPROBS, pa.array(ref, S.PER_TOKEN))

    stats, weights = {}, {}
    for mode, cfg in (("auto", auto), ("always", always)):
        policy = PolicyWorker(cfg, 0, 1)  # both start from the same saved tiny model
        policy.init_group("127.0.0.1", find_free_port("127.0.0.1"))
        given = batch if mode == "auto" else merge_columns(batch, policy.logprobs(batch))
        assert (S.OLD_LOGPROBS in given.schema.names) == (mode == "always")
        stats[mode] = policy.train(given)
        weights[mode] = {n: p.detach().clone() for n, p in policy.engine.module.named_parameters()}
    tokens = [a for row in adv for a in row]
    expected = -sum(tokens) / len(tokens) + auto.algo.kl_coef * stats["auto"]["policy/kl_to_ref"]
    assert stats["auto"]["policy/loss"] == pytest.approx(expected, rel=1e-6)
    assert stats["auto"]["policy/ratio_mean"] == 1.0 and stats["auto"]["policy/approx_kl"] == 0.0
    for key in ("policy/loss", "policy/grad_norm", "policy/kl_to_ref", "policy/entropy", "policy/clip_frac"):
        assert stats["auto"][key] == pytest.approx(stats["always"][key], rel=1e-5, abs=1e-7), key
    assert stats["auto"]["policy/grad_norm"] > 0
    for name, w in weights["auto"].items():
        torch.testing.assert_close(w, weights["always"][name], rtol=1e-5, atol=1e-7)


def test_the_stale_weight_alarm_checks_a_sample_when_old_logprobs_are_not_recomputed(tiny_cfg, rollout, prompts):
    """Without the old log-prob pass the driver asks the learner for a seeded eighth of the batch every
    sync.check_every iterations: it agrees with the engine on current weights and raises once the weights differ."""
    from rlhf_dist.comm.process_group import find_free_port
    from rlhf_dist.trainers.ppo import batch_stats
    from rlhf_dist.trainers.stale_weights import alarm_sample, check_fresh_weights
    from rlhf_dist.workers.policy import PolicyWorker
    from rlhf_dist.workers.reward import RewardWorker

    cfg = tiny_cfg(
        "train.prompts_per_iteration=8",
        "train.engine=torch",
        "generation.max_new_tokens=8",
        "train.micro_batch_size=2",  # chunks of the sample, not the config's count for the whole batch
        "sync.check_every=3",
    )
    policy = PolicyWorker(cfg, 0, 1)
    policy.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    samples = rollout.generate(prompts, iteration=7)
    batch = merge_columns(samples, RewardWorker(cfg).score(samples))
    assert alarm_sample(batch, cfg, 1, ranks=1) is None and alarm_sample(batch, cfg, 5, ranks=1) is None
    sample = alarm_sample(batch, cfg, 6, ranks=1)
    assert len(sample) == 1 and sample.equals(alarm_sample(batch, cfg, 6, ranks=1))  # 8 samples / 8, repeatable
    three = alarm_sample(samples, cfg, 0, ranks=3)  # at least one per rank, equal shards
    assert len(three) == 3 and len(policy.logprobs(three, subset=True).column(S.OLD_LOGPROBS)) == 3

    def stats():
        return batch_stats(batch, 0, merge_columns(sample, policy.logprobs(sample, subset=True)))

    fresh = stats()
    assert fresh["logprob_checked_samples"] == 1 and fresh["logprob_mismatch"] < 1e-4
    check_fresh_weights(batch, 0, 0, fresh, cfg.sync.max_logprob_mismatch)
    unchecked = batch_stats(batch, 0)
    assert unchecked["logprob_checked_samples"] == 0 and np.isnan(unchecked["logprob_mismatch"])
    check_fresh_weights(batch, 0, 0, unchecked, cfg.sync.max_logprob_mismatch)
    with torch.no_grad():  # the learner moves on; the engine missed the push
        for p in policy.engine.module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    stale = stats()
    assert stale["logprob_mismatch"] > cfg.sync.max_logprob_mismatch
    with pytest.raises(RuntimeError, match="rollout and learner log-probs differ"):
        check_fresh_weights(batch, 0, 0, stale, cfg.sync.max_logprob_mismatch)


def test_after_a_push_engine_and_learner_score_the_same_sample_and_a_missed_push_raises(cfg, prompts):
    """The pipelined schedules' check: two engines give the log-probs of responses they are handed (teacher-forced)
    with the version they hold; right after the push they equal the policy's, and an engine that missed the push
    (other weights, or another version) makes the check fail."""
    from rlhf_dist.comm.process_group import find_free_port
    from rlhf_dist.trainers.stale_weights import check_logprob_gap, pushed_weight_stats
    from rlhf_dist.workers.policy import PolicyWorker
    from rlhf_dist.workers.rollout import RolloutWorker

    engines = [RolloutWorker(cfg, rank=r) for r in range(2)]
    policy = PolicyWorker(cfg, 0, 1)
    policy.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    generated = engines[0].generate(prompts, iteration=3)
    sample = generated.select([S.PROMPT_IDS, S.RESPONSE_IDS])
    scored = engines[0].engine_logprobs(sample)
    assert scored.column(S.POLICY_VERSION).to_pylist() == [0] * len(sample)
    # teacher-forced scoring agrees with what the engine recorded while it sampled those very tokens
    for got, recorded in zip(scored.column(S.ROLLOUT_LOGPROBS).to_pylist(), generated.column(S.ROLLOUT_LOGPROBS)):
        np.testing.assert_allclose(got, recorded.as_py(), atol=1e-5)

    with torch.no_grad():  # the learner trains; both engines take its weights as version 1
        for p in policy.engine.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {n: p.detach().clone() for n, p in policy.engine.module.named_parameters()}
    for rollout in engines:
        rollout.engine.load_weights(weights.items())
        rollout.version = 1
    learner = policy.logprobs(sample, subset=True)
    stats = pushed_weight_stats([r.engine_logprobs(sample) for r in engines], learner, 1)
    assert stats["logprob_checked_samples"] == len(sample) and stats["logprob_mismatch"] < 1e-5
    check_logprob_gap(stats, cfg.sync.max_logprob_mismatch)

    engines[1].engine.load_weights((n, w + 0.5 * torch.randn_like(w)) for n, w in weights.items())  # missed it
    stale = pushed_weight_stats([r.engine_logprobs(sample) for r in engines], learner, 1)
    with pytest.raises(RuntimeError, match="rollout and learner log-probs differ"):
        check_logprob_gap(stale, cfg.sync.max_logprob_mismatch)
    engines[1].engine.load_weights(weights.items())
    engines[1].version = 0  # the right weights under another version still fail: the version is part of the check
    behind = pushed_weight_stats([r.engine_logprobs(sample) for r in engines], learner, 1)
    assert np.isnan(behind["logprob_mismatch"])
    with pytest.raises(RuntimeError, match="differ by nan"):
        check_logprob_gap(behind, cfg.sync.max_logprob_mismatch)


def test_a_rollout_actor_that_loads_another_policy_generates_as_one_started_from_it(cfg, prompts, tmp_path):
    """``load_policy`` (the pipeline's comparison: one set of rollout actors for every policy) leaves the engine as
    an actor started from that policy's directory would be: the same tokens and log-probs."""
    import dataclasses

    from rlhf_dist.models.tiny import build_tiny
    from rlhf_dist.workers.rollout import RolloutWorker

    other = str(build_tiny(tmp_path / "other", seed=5))
    switched = RolloutWorker(cfg, rank=0)
    before = switched.generate(prompts, iteration=2)
    switched.load_policy(other)
    fresh = RolloutWorker(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=other)), rank=0)
    after, expected = switched.generate(prompts, iteration=2), fresh.generate(prompts, iteration=2)
    assert after.column(S.RESPONSE_IDS).equals(expected.column(S.RESPONSE_IDS))
    assert after.column(S.ROLLOUT_LOGPROBS).equals(expected.column(S.ROLLOUT_LOGPROBS))
    assert not after.column(S.RESPONSE_IDS).equals(before.column(S.RESPONSE_IDS))  # another model indeed
