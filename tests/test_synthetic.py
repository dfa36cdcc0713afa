"""The synthetic task: prompts, corpus, the gold scorer (hand-checked numbers) and the noisy preference reward."""

import math
import random
import statistics

import pytest

from rlhf_dist.data import synthetic
from rlhf_dist.data.synthetic import gold_reward, preference_reward


@pytest.mark.parametrize(
    "response, expected",
    [
        ("", 0.0),
        ("...", 0.0),  # no words at all
        ("good kind warm nice", 1.0),  # 4 distinct positive words
        ("good", 0.25),  # short answers count as 4 words
        ("the cat good", 0.25),  # 1 positive / max(3, 4)
        ("good good good good", (4 - 0.5 * 3) / 4),  # 3 repeats cost 1.5
        ("Happy, happy dog!", (2 - 0.5 * 1) / 4),  # case and punctuation do not split or hide words
        ("the the the the the", 0.0),  # negative before clipping
        ("goods gooder", 0.0),  # only whole words count
        ("good kind warm nice calm fair joy fun the cat", 8 / 10),
        ("happy5sunny", 2 / 4),  # a digit ends a word
    ],
)
def test_gold_reward_hand_checked(response, expected):
    assert gold_reward("the cat sat on", response) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_ignores_prompt_and_stays_in_unit_interval():
    rng = random.Random(0)
    for _ in range(500):
        response = " ".join(rng.choice(synthetic.VOCABULARY) for _ in range(rng.randint(0, 12)))
        score = gold_reward("the dog ran to", response)
        assert 0.0 <= score <= 1.0
        assert score == gold_reward("my friend saw a", response)


def test_make_prompts_deterministic_neutral_and_short():
    prompts = synthetic.make_prompts(200, seed=3)
    assert prompts == synthetic.make_prompts(200, seed=3)
    assert prompts != synthetic.make_prompts(200, seed=4)
    assert len(set(prompts)) > 150
    neutral = set(synthetic.NEUTRAL_WORDS)
    for prompt in prompts:
        words = prompt.split()
        assert 4 <= len(words) <= 7 and set(words) <= neutral
        assert gold_reward("", prompt) == 0.0  # prompts themselves earn nothing
    assert synthetic.make_prompts(0, seed=0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic.make_prompts(-1, seed=0)


def test_corpus_covers_vocabulary_and_demonstrates_high_reward():
    lines = synthetic.corpus(2000, seed=0)
    assert len(lines) == 2000 and lines == synthetic.corpus(2000, seed=0)
    seen = {word for line in lines for word in line.split()}
    assert set(synthetic.VOCABULARY) <= seen
    # A demonstration is a prompt (4-7 words) plus a response that scores well; scoring the whole line, prompt
    # words included, still gives far more than a random policy's ~0.1.
    mean_line_score = statistics.fmean(gold_reward("", line) for line in lines)
    assert mean_line_score > 0.35
    n_positive = sum(word in synthetic.POSITIVE_WORDS for line in lines for word in line.split())
    assert n_positive / sum(len(line.split()) for line in lines) > 0.35


def test_preference_reward_is_gold_plus_small_fixed_noise():
    rng = random.Random(1)
    prompts = synthetic.make_prompts(3000, seed=1)
    responses = [" ".join(rng.choice(synthetic.VOCABULARY) for _ in range(rng.randint(1, 10))) for _ in prompts]
    preferred = preference_reward(prompts, responses)
    assert preferred == preference_reward(prompts, responses)  # same text, same score
    gold = [gold_reward(p, r) for p, r in zip(prompts, responses)]
    noise = [a - b for a, b in zip(preferred, gold)]
    assert abs(statistics.fmean(noise)) < 0.005  # 3 standard errors of 0.05/sqrt(3000)
    assert statistics.stdev(noise) == pytest.approx(synthetic.PREFERENCE_NOISE, rel=0.1)
    assert statistics.correlation(preferred, gold) > 0.9
    assert all(math.isfinite(x) for x in preferred)
    # the noise depends on the prompt too, so one response gets different scores under different prompts
    assert preference_reward(["a", "b"], ["good", "good"])[0] != preference_reward(["a", "b"], ["good", "good"])[1]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        preference_reward(["a", "b"], ["good"])
