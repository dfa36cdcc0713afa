"""Models from local directories (``load``), the tiny default model (``tiny``), the critic (``value_head``), and
per-token log-probs for every role (``logprobs``). No re-exports here: a role that only needs ``logprobs`` (a reward
actor scoring with a function) must not import transformers through this package."""
