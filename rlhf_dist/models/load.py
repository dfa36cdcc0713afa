"""Loading models and tokenizers from a local directory, the same way for every role.

Only local paths: there is no model hub here, so a name like "Qwen/Qwen2.5-0.5B" must be a directory on disk. Every
loader checks the directory first and says what is missing and how to get a model (`rlhf-dist init-tiny DIR`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_dist.models.value_head import CriticModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_FIX = (
    "build the tiny default model there with `rlhf-dist init-tiny DIR`, or point to a directory saved with "
    "save_pretrained (config.json, weights, tokenizer files)"
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "float32" | "bfloat16" | "float16" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(path: str | os.PathLike, *, need_tokenizer: bool = False) -> Path:
    """The directory as a Path, or a FileNotFoundError naming what is missing and the fix."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist (models load from local paths only); {_FIX}"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json, so it is not a saved model; {_FIX}")
    if need_tokenizer and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the "
            f"tokenizer next to the model with tokenizer.save_pretrained(dir), or {_FIX}"
        )
    return directory


def load_tokenizer(path: str | os.PathLike, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`, with a pad token guaranteed (EOS, else UNK, stands in when there is none).

    Left padding is the default because batched generation needs the prompts to end at the same column.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(path, need_tokenizer=True))
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token
        if stand_in is None:
            raise ValueError(
                f"the tokenizer in {path} has no pad, eos or unk token to pad with; add a pad token "
                f"(tokenizer.add_special_tokens({{'pad_token': '<pad>'}})) and save it again"
            )
        tokenizer.pad_token = stand_in
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None
) -> PreTrainedModel:
    """AutoModelForCausalLM from `path` in `dtype`, on `device` (CPU when None), in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(path), dtype=resolve_dtype(dtype))
    if device is not None:
        model.to(device)
    return model.eval()


def load_reward_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", *, seed: int = 0
) -> PreTrainedModel:
    """A scalar reward model: AutoModelForSequenceClassification with num_labels=1.

    A directory holding only a causal LM gets a freshly initialised score head (that is how reward-model training
    starts), drawn from `seed` on a private RNG stream so every worker starts from the same head. The config gets a
    pad_token_id (from the tokenizer when the config lacks one), which Hugging Face needs to find the last real
    token when it pools a padded batch itself.
    """
    directory = check_model_dir(path)
    pad_token_id = _pad_token_id(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extra = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, dtype=resolve_dtype(dtype), **extra
        )
    return model.eval()


def load_critic(path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> CriticModel:
    """A CriticModel (backbone + scalar value head) from a critic directory or a plain causal-LM directory."""
    return CriticModel.from_pretrained(check_model_dir(path), dtype=resolve_dtype(dtype)).eval()


def _pad_token_id(directory: Path) -> int | None:
    """The config's pad_token_id if set, else the tokenizer's (after load_tokenizer's stand-in), else None."""
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return load_tokenizer(directory).pad_token_id
    return None
