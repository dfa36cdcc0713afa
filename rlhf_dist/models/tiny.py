"""The tiny default model: a real BPE tokenizer and a small Llama, built locally and saved like any hub model.

Everything downstream loads it with `AutoTokenizer.from_pretrained(dir)` / `AutoModelForCausalLM.from_pretrained(dir)`
(and vLLM loads it the same way), so the tiny model exercises exactly the code paths a Qwen or Llama checkpoint does.
The tokenizer is trained on `rlhf_dist.data.synthetic.corpus`; it turns every word of the synthetic task into one
token, which is what makes the task learnable by a randomly initialised model in minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_dist.config import RunConfig
from rlhf_dist.data import synthetic

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3
# Plain-text roles keep the template inside the tokenizer's alphabet; the model ends each turn with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MARKER = "rlhf_dist_tiny.json"  # written last inside the build; its presence means the directory is complete
_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The tokenizer is trained on a fixed corpus, independent of the weight seed, so tiny models built with different
# seeds (a policy and a reward model, say) share one vocabulary.
_CORPUS_LINES, _CORPUS_SEED = 2000, 0
MAX_POSITIONS = 512
FORMAT_VERSION = 1


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-free BPE tokenizer (Metaspace pre-tokenizer, as in Llama/SentencePiece) on the synthetic corpus.

    `vocab_size` is an upper bound: merges stop once every corpus word is a single token (about 340 tokens), which
    keeps a random policy's vocabulary dense in whole words. The alphabet is printable ASCII plus newline so any
    English prompt and the chat template encode without <unk>.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n")
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the special tokens and the alphabet alone need "
            f"{len(SPECIAL_TOKENS) + len(alphabet)}; use 512"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(synthetic.corpus(_CORPUS_LINES, _CORPUS_SEED), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast, *, hidden: int, layers: int, heads: int, head_dim: int | None
) -> LlamaConfig:
    """A Llama config sized by the arguments; head_dim None means hidden // heads."""
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be a multiple of heads={heads} when head_dim is None")
        head_dim = hidden // heads
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file() and all((directory / name).is_file() for name in _FILES)


def build_tiny(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    head_dim: int | None = 32,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build (or find) the tiny default model and tokenizer in `out_dir`; returns the directory.

    Idempotent: a complete tiny model built with the same arguments is returned untouched. Built in a temporary
    sibling directory and renamed into place, so a failure never leaves a half-written model. The same seed gives
    bitwise the same weights and the same tokenizer. head_dim is decoupled from hidden / heads because vLLM's CPU
    attention only runs head sizes 32, 64, 80, ... and 64 / 4 = 16 would not load there.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    build_args = {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "head_dim": head_dim,
        "seed": seed,
    }
    if out_dir.exists() and not overwrite:
        if _is_complete(out_dir):
            found = json.loads((out_dir / MARKER).read_text())
            if found != build_args:
                raise FileExistsError(
                    f"{out_dir} holds a tiny model built with {found}, not {build_args}; "
                    f"pass overwrite=True or choose another directory"
                )
            return out_dir
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists and is not a complete tiny model (that needs {MARKER} and "
                f"{', '.join(_FILES)}); pass overwrite=True to replace it, or choose another "
                f"directory"
            )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is shared with other users' workers
    try:
        tokenizer = train_tokenizer(vocab_size)
        config = tiny_config(tokenizer, hidden=hidden, layers=layers, heads=heads, head_dim=head_dim)
        # A private RNG stream: the caller's global torch RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _name_portable_tokenizer_class(tmp)
        (tmp / MARKER).write_text(json.dumps(build_args, indent=1) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _name_portable_tokenizer_class(directory: Path) -> None:
    """transformers 5 writes its new class name "TokenizersBackend", which transformers 4 (still pinned by many vLLM
    releases) cannot resolve; "PreTrainedTokenizerFast" names the same class in both."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` (empty, or replaced on overwrite) is removed only after."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def ensure_tiny_model(cfg: RunConfig) -> None:
    """Build the tiny model at ``model.policy`` when the config asks for it (``model.build_tiny_if_missing``) and
    nothing is there yet."""
    if cfg.model.build_tiny_if_missing and not (Path(cfg.model.policy) / "config.json").exists():
        build_tiny(cfg.model.policy, seed=cfg.seed)
