"""Every Arrow column that passes between roles, in one place.

Ragged token columns are ``list<int32>``, ragged per-token floats are ``list<float32>`` (one value per response
token, aligned with ``response_ids``), scalars are plain columns. A batch only carries the columns its phase has
produced so far; ``EXPERIENCE_SCHEMA`` is the full set, in canonical order.
"""

from __future__ import annotations

import pyarrow as pa

TOKENS = pa.list_(pa.int32())
PER_TOKEN = pa.list_(pa.float32())

# identity
SAMPLE_ID = "sample_id"  # int64, unique within an iteration
GROUP_ID = "group_id"  # int64, the prompt a sample answers (GRPO/RLOO groups share it)
# tokens
PROMPT_IDS = "prompt_ids"  # list<int32>, no padding
RESPONSE_IDS = "response_ids"  # list<int32>, no padding; may be empty
# text (reward functions and judges read text)
PROMPT_TEXT = "prompt_text"  # string
RESPONSE_TEXT = "response_text"  # string
# per response token
ROLLOUT_LOGPROBS = "rollout_logprobs"  # list<float32>, log-prob of each response token under the rollout engine
REF_LOGPROBS = "ref_logprobs"  # list<float32>, under the frozen reference model
OLD_LOGPROBS = "old_logprobs"  # list<float32>, under the learner before this iteration's update
VALUES = "values"  # list<float32>, critic value before each response token's action
ADVANTAGES = "advantages"  # list<float32>
RETURNS = "returns"  # list<float32>
# scalars
REWARD = "reward"  # float32, the score the algorithm optimises (reward model and/or function)
GOLD_REWARD = "gold_reward"  # float32, hidden true score of a synthetic task (NaN where unknown)
POLICY_VERSION = "policy_version"  # int64, version of the weights that generated the sample

FIELDS: dict[str, pa.DataType] = {
    SAMPLE_ID: pa.int64(),
    GROUP_ID: pa.int64(),
    PROMPT_IDS: TOKENS,
    RESPONSE_IDS: TOKENS,
    PROMPT_TEXT: pa.string(),
    RESPONSE_TEXT: pa.string(),
    ROLLOUT_LOGPROBS: PER_TOKEN,
    REF_LOGPROBS: PER_TOKEN,
    OLD_LOGPROBS: PER_TOKEN,
    VALUES: PER_TOKEN,
    ADVANTAGES: PER_TOKEN,
    RETURNS: PER_TOKEN,
    REWARD: pa.float32(),
    GOLD_REWARD: pa.float32(),
    POLICY_VERSION: pa.int64(),
}

EXPERIENCE_SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype in FIELDS.items()])
PER_TOKEN_COLUMNS = tuple(name for name, dtype in FIELDS.items() if dtype == PER_TOKEN)


def field(name: str) -> pa.Field:
    """The schema field for a column name; an unknown name is an error that lists the known ones."""
    if name not in FIELDS:
        raise KeyError(f"unknown experience column {name!r}; known columns: {', '.join(FIELDS)}")
    return pa.field(name, FIELDS[name])
