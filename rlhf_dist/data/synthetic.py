"""A synthetic RLHF task whose true ("gold") reward is known in code.

Prompts are short neutral word sequences ("the cat sat on the"). The gold scorer likes responses made of many
*different* positive words ("happy kind warm ..."): the score is the share of response words that are positive,
minus a mild penalty for every repeated word, so the optimum is a varied positive phrase, not one token repeated.

Why this property: the tiny tokenizer turns every word of the task into a single token, so a randomly initialised
policy (close to uniform over the vocabulary) already says a positive word now and then, a gold rate of roughly
0.05-0.15, and PPO only has to raise the probability of about thirty tokens, which a tiny model does within tens of
iterations on a CPU. `preference_reward` stands for a human rater: the gold score plus small noise that is a fixed
function of the text, so it is correlated with the gold score but not identical, and the same text always gets the
same score.
"""

from __future__ import annotations

import hashlib
import random
import re
from statistics import NormalDist

DETERMINERS = ("the", "a", "my", "our", "this", "that", "every")
NOUNS = (
    "cat",
    "dog",
    "bird",
    "child",
    "friend",
    "teacher",
    "farmer",
    "garden",
    "house",
    "river",
    "tree",
    "road",
    "city",
    "book",
    "song",
    "letter",
    "window",
    "table",
    "morning",
    "evening",
    "boat",
    "hill",
)
VERBS = ("sat", "ran", "saw", "found", "made", "walked", "read", "wrote", "opened", "watched", "carried", "painted")
PREPOSITIONS = ("on", "in", "by", "with", "near", "under", "over", "to", "from", "behind")
CONJUNCTIONS = ("and", "then", "so", "but", "because")
NEUTRAL_WORDS = DETERMINERS + NOUNS + VERBS + PREPOSITIONS + CONJUNCTIONS
POSITIVE_WORDS = (
    "good",
    "great",
    "happy",
    "kind",
    "warm",
    "bright",
    "calm",
    "gentle",
    "lovely",
    "joy",
    "love",
    "fun",
    "nice",
    "sweet",
    "glad",
    "brave",
    "fair",
    "smile",
    "hope",
    "cheer",
    "proud",
    "cozy",
    "sunny",
    "friendly",
    "thank",
    "wonderful",
    "peace",
    "bliss",
    "delight",
    "laugh",
)
VOCABULARY = NEUTRAL_WORDS + POSITIVE_WORDS
_POSITIVE = frozenset(POSITIVE_WORDS)

# Each repeated word costs half of what a positive word earns: one positive word said four times scores 0.625,
# four different positive words score 1.0.
REPEAT_PENALTY = 0.5
# Shorter responses are scored as if padded to this many words, so "good" then end-of-text is not already optimal.
MIN_WORDS = 4
# Standard deviation of the rater's noise in `preference_reward`, on the gold scale [0, 1].
PREFERENCE_NOISE = 0.05

_WORD = re.compile(r"[a-z]+")

# Prompt shapes, as word classes; each is a sentence cut off where the response should continue.
_PROMPT_TEMPLATES = (
    ("det", "noun", "verb", "prep"),
    ("det", "noun", "verb", "prep", "det"),
    ("det", "noun", "verb", "prep", "det", "noun", "conj"),
    ("det", "noun", "conj", "det", "noun", "verb"),
    ("det", "noun", "verb", "det", "noun", "conj"),
    ("det", "noun", "prep", "det", "noun", "verb"),
)
_CLASSES = {"det": DETERMINERS, "noun": NOUNS, "verb": VERBS, "prep": PREPOSITIONS, "conj": CONJUNCTIONS}


def _prompt(rng: random.Random) -> str:
    template = rng.choice(_PROMPT_TEMPLATES)
    return " ".join(rng.choice(_CLASSES[word_class]) for word_class in template)


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts of 4 to 7 neutral words, the same list for the same seed."""
    if n < 0:
        raise ValueError(f"make_prompts: n must be >= 0, got {n}")
    rng = random.Random(f"prompts-{seed}")
    return [_prompt(rng) for _ in range(n)]


def _good_response(rng: random.Random) -> str:
    """A demonstration: 3 to 8 words, mostly distinct positive words with a neutral word now and then."""
    n_words = rng.randint(3, 8)
    positives = rng.sample(POSITIVE_WORDS, n_words)
    return " ".join(word if rng.random() < 0.8 else rng.choice(NOUNS) for word in positives)


def corpus(n_lines: int, seed: int) -> list[str]:
    """`n_lines` lines of "prompt + good response" text, for training the tokenizer and as SFT demonstrations.

    Every word of `VOCABULARY` occurs often in a few hundred lines, so the tokenizer learns each as one token.
    """
    if n_lines < 0:
        raise ValueError(f"corpus: n_lines must be >= 0, got {n_lines}")
    rng = random.Random(f"corpus-{seed}")
    return [f"{_prompt(rng)} {_good_response(rng)}" for _ in range(n_lines)]


def words(text: str) -> list[str]:
    """The words of a text as the gold scorer sees them: maximal runs of letters, lower-cased."""
    return _WORD.findall(text.lower())


def gold_reward(prompt_text: str, response_text: str) -> float:
    """The hidden true score of one response, in [0, 1].

    (positive words - REPEAT_PENALTY * repeated words) / max(words, MIN_WORDS), clipped to [0, 1], where a repeated
    word is any occurrence of a word after its first. The prompt does not enter the score; it is an argument so
    that this has the shape of every reward function.
    """
    del prompt_text
    response_words = words(response_text)
    if not response_words:
        return 0.0
    n_positive = sum(word in _POSITIVE for word in response_words)
    n_repeated = len(response_words) - len(set(response_words))
    score = (n_positive - REPEAT_PENALTY * n_repeated) / max(len(response_words), MIN_WORDS)
    return min(1.0, max(0.0, score))


def _text_noise(prompt_text: str, response_text: str) -> float:
    """A N(0, PREFERENCE_NOISE) draw that is a fixed function of the text (same on every machine and run)."""
    digest = hashlib.blake2b(f"{prompt_text}\x1f{response_text}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 0.5) / 2**64  # strictly inside (0, 1)
    return NormalDist(0.0, PREFERENCE_NOISE).inv_cdf(uniform)


def preference_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward function in the batch form of `reward.function: "module:function"`: one float per (prompt, response).

    The gold score plus deterministic noise, not clipped (clipping would bias scores near 0 and 1).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"preference_reward: got {len(prompts)} prompts but {len(responses)} responses")
    return [gold_reward(p, r) + _text_noise(p, r) for p, r in zip(prompts, responses)]
