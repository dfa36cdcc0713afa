"""SFT, reward-model and DPO learners and the labellers, driven in-process (no Ray): the classes the actors wrap,
on real DeepSpeed engines (ZeRO-2, one rank) and real Arrow/Parquet data read through rlhf_dist.data.datasets."""

import math
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlhf_dist.data import schema as S
from rlhf_dist.data.datasets import write_parquet
from rlhf_dist.data.synthetic import NEUTRAL_WORDS, POSITIVE_WORDS, corpus, gold_reward, make_prompts
from rlhf_dist.trainers import offline
from rlhf_dist.workers.labeller import PAIR_SCHEMA, LabellerWorker, bradley_terry_prob


@pytest.fixture
def cfg(tiny_cfg):
    return lambda *o: tiny_cfg("train.engine=deepspeed", "train.zero_stage=2", "logging.plot=false", *o)


def start(learner_cls, cfg):
    from rlhf_dist.comm.process_group import find_free_port

    learner = learner_cls(cfg, 0, 1)
    learner.init_group("127.0.0.1", find_free_port("127.0.0.1"))
    return learner


def run_epochs(learner, train, epochs: int, batch_size: int) -> None:
    for epoch in range(1, epochs + 1):
        for batch in offline.epoch_batches(train, batch_size, seed=0, epoch=epoch):
            learner.train(batch)


def pairs_batch(tokenizer, prompts, a, b) -> pa.RecordBatch:
    ids = lambda texts: pa.array(tokenizer(list(texts), add_special_tokens=False)["input_ids"], S.TOKENS)  # noqa
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(len(a), dtype=np.int64)), pa.array(prompts), ids(prompts), pa.array(a), pa.array(b)],
        schema=PAIR_SCHEMA,
    )


def random_answers(n: int, seed: int) -> list[str]:
    """3-6 words, each positive with a per-answer probability drawn uniformly: gold scores spread over [0, 1]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.random()
        out.append(
            " ".join(
                rng.choice(POSITIVE_WORDS) if rng.random() < p else rng.choice(NEUTRAL_WORDS)
                for _ in range(rng.randint(3, 6))
            )
        )
    return out


def labelled_pairs(cfg, tokenizer, n: int, path) -> str:
    """n pairs of random answers, labelled by the simulated raters of `cfg`, written as a preference Parquet."""
    pairs = pairs_batch(tokenizer, make_prompts(n, seed=3), random_answers(n, 1), random_answers(n, 2))
    write_parquet([LabellerWorker(cfg).label(pairs)], path)
    return str(path)


# --- SFT ------------------------------------------------------------------------------------------------------------


def test_synthetic_demonstrations_cut_corpus_lines_at_the_first_positive_word():
    from rlhf_dist.trainers.sft import synthetic_demonstrations

    rows = synthetic_demonstrations(300, seed=0)
    lines = set(corpus(300, 0))
    assert len(rows["prompt"]) > 290
    for prompt, response in zip(rows["prompt"], rows["response"]):
        assert f"{prompt} {response}" in lines
        assert all(w in NEUTRAL_WORDS for w in prompt.split()) and response.split()[0] in POSITIVE_WORDS


def test_sft_loss_is_response_only_and_falls(cfg, tmp_path):
    from rlhf_dist.models.load import load_causal_lm, load_tokenizer
    from rlhf_dist.trainers.sft import demonstrations_path
    from rlhf_dist.workers.sft_learner import SFTLearner

    c = cfg("sft.demonstrations=600", "sft.batch_size=32")
    tokenizer = load_tokenizer(c.model.policy)
    spec = offline.dataset_spec(c, "sft", "demonstrations", demonstrations_path(c))
    data, report = offline.read_tokenized(spec, tokenizer, "sft.data.path")
    assert report["rows_kept"] == len(data) > 590
    train, held = offline.split_held_out(data, c.sft, c.seed, "sft")
    learner = start(SFTLearner, c)

    # The loss pinned by hand: cross-entropy of the response tokens only, from a plain HF forward of the same model.
    few = held.slice(0, 3)
    model = load_causal_lm(c.model.policy)
    nll, n_tokens = 0.0, 0
    for p, r in zip(few.column(S.PROMPT_IDS).to_pylist(), few.column(S.RESPONSE_IDS).to_pylist()):
        logits = model(torch.tensor([p + r])).logits[0]
        nll -= torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(1, torch.tensor(r)[:, None]).sum().item()
        n_tokens += len(r)
    sums = learner.evaluate(few)
    assert sums["tokens"] == n_tokens
    assert sums["nll"] / sums["tokens"] == pytest.approx(nll / n_tokens, rel=1e-5)

    before = SFTLearner.eval_metrics(learner.evaluate(held))
    run_epochs(learner, train, epochs=2, batch_size=32)
    after = SFTLearner.eval_metrics(learner.evaluate(held))
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))


# --- reward model ---------------------------------------------------------------------------------------------------


def test_reward_model_learns_simulated_preferences(cfg, tmp_path):
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.workers.rm_learner import RMLearner

    c = cfg("collect.noise_temperature=0.02", "collect.flip_rate=0", "rm.lr=1e-3", "rm.eval_fraction=0.25")
    tokenizer = load_tokenizer(c.model.policy)
    path = labelled_pairs(c, tokenizer, 400, tmp_path / "prefs.parquet")
    data, _ = offline.read_tokenized(offline.dataset_spec(c, "rm", "preferences", path), tokenizer, "rm.data.path")
    train, held = offline.split_held_out(data, c.rm, c.seed, "rm")
    assert (len(train), len(held)) == (300, 100)
    learner = start(RMLearner, c)
    before = RMLearner.eval_metrics(learner.evaluate(held))
    run_epochs(learner, train, epochs=2, batch_size=32)
    after = RMLearner.eval_metrics(learner.evaluate(held))
    assert abs(before["accuracy"] - 0.5) < 0.2, before
    assert after["accuracy"] > 0.75 and after["margin"] > 0.3, (before, after)


# --- DPO ------------------------------------------------------------------------------------------------------------


def test_dpo_raises_the_chosen_over_rejected_margin(cfg, tmp_path):
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.trainers.dpo import add_reference_logps, reference_config
    from rlhf_dist.workers.dataset_learner import stack_pairs
    from rlhf_dist.workers.dpo_learner import DPOLearner
    from rlhf_dist.workers.reference import ReferenceWorker

    c = cfg(
        "collect.noise_temperature=0",
        "collect.flip_rate=0",
        "dpo.lr=1e-3",
        "dpo.eval_fraction=0.2",
        "dpo.micro_batch_size=8",
    )
    tokenizer = load_tokenizer(c.model.policy)
    path = labelled_pairs(c, tokenizer, 240, tmp_path / "prefs.parquet")
    data, _ = offline.read_tokenized(offline.dataset_spec(c, "dpo", "preferences", path), tokenizer, "dpo.data.path")
    reference = ReferenceWorker(reference_config(c))
    data = add_reference_logps(data, reference.logprobs(stack_pairs(data)))
    train, held = offline.split_held_out(data, c.dpo, c.seed, "dpo")
    learner = start(DPOLearner, c)
    assert learner.micro_per_step == 4  # 32 rows per step in micro-batches of 8: gradient accumulation

    # Before any step the policy is the reference: implicit rewards are exactly 0 and the loss is log 2.
    before = DPOLearner.eval_metrics(learner.evaluate(held))
    assert before["margin"] == pytest.approx(0.0, abs=1e-4)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    run_epochs(learner, train, epochs=2, batch_size=32)
    after = DPOLearner.eval_metrics(learner.evaluate(held))
    assert after["margin"] > 0.08 and after["accuracy"] > 0.75 and after["loss"] < math.log(2) - 0.03, after


# --- labellers ------------------------------------------------------------------------------------------------------


def _gold_pairs(tokenizer, n: int) -> pa.RecordBatch:
    return pairs_batch(tokenizer, make_prompts(n, seed=5), random_answers(n, 11), random_answers(n, 12))


def test_simulated_labellers_flip_the_configured_share(tiny_cfg):
    from rlhf_dist.models.load import load_tokenizer

    n, flip = 4000, 0.2
    c = tiny_cfg("collect.noise_temperature=0", f"collect.flip_rate={flip}")
    labels = LabellerWorker(c).label(_gold_pairs(load_tokenizer(c.model.policy), n))
    chosen, rejected = (
        np.array([gold_reward("", t) for t in labels.column(k).to_pylist()]) for k in ("chosen", "rejected")
    )
    decided = chosen != rejected
    wrong = float(np.mean(chosen[decided] < rejected[decided]))
    sigma = math.sqrt(flip * (1 - flip) / decided.sum())
    assert abs(wrong - flip) < 4 * sigma, (wrong, flip)
    flipped = labels.column("flipped").to_numpy(zero_copy_only=False)
    assert abs(flipped.mean() - flip) < 4 * math.sqrt(flip * (1 - flip) / n)
    # with T = 0 a decided pair is wrong exactly when its label was flipped
    assert np.array_equal((chosen < rejected)[decided], flipped[decided])
    np.testing.assert_allclose(labels.column("score_chosen").to_numpy(), chosen, rtol=1e-6)


def test_simulated_labellers_follow_bradley_terry(tiny_cfg):
    from rlhf_dist.models.load import load_tokenizer

    n, temperature = 4000, 0.1
    c = tiny_cfg(f"collect.noise_temperature={temperature}", "collect.flip_rate=0")
    labels = LabellerWorker(c).label(_gold_pairs(load_tokenizer(c.model.policy), n))
    u_c, u_r = labels.column("score_chosen").to_numpy(), labels.column("score_rejected").to_numpy()
    diff = np.abs(u_c - u_r)[u_c != u_r]
    expected = float(np.mean(1 / (1 + np.exp(-diff / temperature))))  # P(the better one is chosen)
    observed = float(np.mean((u_c > u_r)[u_c != u_r]))
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / len(diff)), (observed, expected)
    assert 0.6 < observed < 0.95  # noisy, but far from a coin toss
    np.testing.assert_allclose(
        labels.column("p_chosen").to_numpy(), bradley_terry_prob(u_c, u_r, temperature), rtol=1e-5
    )


def test_labels_do_not_depend_on_how_pairs_are_split_over_labellers(tiny_cfg):
    from rlhf_dist.models.load import load_tokenizer

    c = tiny_cfg()
    pairs = _gold_pairs(load_tokenizer(c.model.policy), 50)
    whole = LabellerWorker(c, rank=0).label(pairs)
    parts = [LabellerWorker(c, rank=1).label(pairs.slice(0, 20)), LabellerWorker(c, rank=2).label(pairs.slice(20))]
    for name in ("chosen", "rejected", "flipped", "p_chosen"):
        assert pa.concat_arrays([p.column(name) for p in parts]).equals(whole.column(name))


def test_ai_judges_pick_the_higher_score(tiny_cfg, tiny_model):
    from rlhf_dist.data.synthetic import preference_reward
    from rlhf_dist.models.load import load_tokenizer

    pairs = _gold_pairs(load_tokenizer(tiny_model), 40)
    by_function = LabellerWorker(tiny_cfg("collect.judge=function")).label(pairs)
    prompts = by_function.column("prompt").to_pylist()
    chosen = preference_reward(prompts, by_function.column("chosen").to_pylist())
    rejected = preference_reward(prompts, by_function.column("rejected").to_pylist())
    assert all(a > b for a, b in zip(chosen, rejected)) and not any(by_function.column("flipped").to_pylist())
    # A local reward model as judge (the tiny model with a seeded score head): deterministic, higher score wins.
    by_model = LabellerWorker(tiny_cfg("collect.judge=reward_model", f"collect.judge_model={tiny_model}")).label(pairs)
    assert (by_model.column("score_chosen").to_numpy() >= by_model.column("score_rejected").to_numpy()).all()
    assert set(by_model.column("judge").to_pylist()) == {"reward_model"}
    # The score pinned independently: Hugging Face's own pooling on one unpadded prompt + answer + EOS.
    from rlhf_dist.models.load import load_reward_model

    tokenizer, model = load_tokenizer(tiny_model), load_reward_model(tiny_model)
    row = by_model.slice(0, 1).to_pylist()[0]
    ids = tokenizer(row["prompt"])["input_ids"] + tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids + [tokenizer.eos_token_id]])).logits[0, 0].item()
    assert row["score_chosen"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_pair_up_drops_pairs_without_a_preference():
    from rlhf_dist.trainers.collect import pair_up

    texts = ["good kind", "warm", "same", "same ", "", "happy", "calm joy", "bright"]
    samples = pa.RecordBatch.from_pydict(
        {
            S.PROMPT_TEXT: [f"p{i // 2}" for i in range(8)],
            S.PROMPT_IDS: pa.array([[i // 2 + 5] for i in range(8)], S.TOKENS),
            S.RESPONSE_IDS: pa.array([[i + 10] for i in range(8)], S.TOKENS),
            S.RESPONSE_TEXT: texts,
        }
    )
    pairs = pair_up(samples, first_id=100)
    assert pairs.column("pair_id").to_pylist() == [100, 103]  # equal texts and an empty answer are dropped
    assert pairs.column("response_a").to_pylist() == ["good kind", "calm joy"]
    assert pairs.column("response_b").to_pylist() == ["warm", "bright"]
    assert pairs.column(S.PROMPT_TEXT).to_pylist() == ["p0", "p3"]
