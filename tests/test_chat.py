"""Chat templates and conversational rows (TRL's messages lists): PPO prompts, SFT/RM/DPO rows, and what the reward
function and reward model see. The expected tokens come from Hugging Face's own apply_chat_template (tokenize=True)
on the tiny tokenizer's template, not from our code; the default (plain text, data.chat_template=auto) is pinned to
the tokenisation as it was before templates existed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.data import schema as S
from rlhf_dist.data.chat import ChatFormat
from rlhf_dist.data.datasets import DataError, DatasetSpec
from rlhf_dist.data.prompts import read_prompt_texts, tokenize_prompts
from rlhf_dist.data.synthetic import make_prompts
from rlhf_dist.trainers.offline import read_tokenized

CONVERSATIONS = [
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the cat sat on"}],
    [{"role": "user", "content": "say hello"}],
    [{"role": "user", "content": "name a colour"}],
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from rlhf_dist.models.load import load_tokenizer

    return load_tokenizer(tiny_model)


def hf_prompt_ids(tok, conversation) -> list[int]:
    return list(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- PPO prompts ---------------------------------------------------------------------------------------------------


def test_messages_prompts_go_through_the_tokenizers_template(tok):
    table = tokenize_prompts(CONVERSATIONS, tok, 64, "auto")
    assert table.column(S.PROMPT_IDS).to_pylist() == [hf_prompt_ids(tok, c) for c in CONVERSATIONS]
    assert table.column(S.PROMPT_TEXT)[1].as_py() == "user: say hello</s>\nassistant:"
    short = tokenize_prompts(CONVERSATIONS, tok, 5, "auto")  # too long: the start goes, the generation prompt stays
    assert short.column(S.PROMPT_IDS)[0].as_py() == hf_prompt_ids(tok, CONVERSATIONS[0])[-5:]


def test_plain_text_prompts_are_tokenised_as_before_templates(tok):
    texts = make_prompts(16, seed=1)  # the default job's prompts
    table = tokenize_prompts(texts, tok, 64)
    assert table.column(S.PROMPT_TEXT).to_pylist() == texts
    assert table.column(S.PROMPT_IDS).to_pylist() == [x[-64:] for x in tok(texts, add_special_tokens=True)["input_ids"]]


def test_a_template_file_applies_to_plain_text_and_none_refuses_messages(tok, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    table = tokenize_prompts(["the cat sat on"], tok, 64, str(path))
    assert table.column(S.PROMPT_TEXT).to_pylist() == ["[user] the cat sat on\n[assistant]"]
    assert (
        table.column(S.PROMPT_IDS)[0].as_py()
        == tok("[user] the cat sat on\n[assistant]", add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(DataError, match=r"^data.prompts: row 0: a messages list, but data.chat_template=none; set"):
        tokenize_prompts(CONVERSATIONS, tok, 64, "none")
    with pytest.raises(ConfigError, match=r"^data.chat_template: '\S+nowhere.jinja' is neither auto, none nor a"):
        tokenize_prompts(CONVERSATIONS, tok, 64, str(tmp_path / "nowhere.jinja"))
    with pytest.raises(ConfigError, match=r"^data.chat_template: .* is not auto, none or a file"):
        from rlhf_dist.config import check_paths

        check_paths(load_config("configs/tiny_cpu.yaml", [f"data.chat_template={tmp_path / 'nowhere.jinja'}"]))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prompt_files_with_messages_rows(tmp_path, fmt):
    rows = [{"prompt": copy.deepcopy(c), "other": i} for i, c in enumerate(CONVERSATIONS)]
    if fmt == "jsonl":
        rows[0]["prompt"][0]["name"] = "ignored"  # fields other than role and content are left out
        path = write_jsonl(tmp_path / "p.jsonl", rows)
    else:
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = load_config("configs/tiny_cpu.yaml", ["data.task=prompts", f"data.prompts={path}"])
    assert read_prompt_texts(cfg) == CONVERSATIONS


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "plain text"}, "row 2, column 'prompt': changed from array to string, expected a list of {role"),
        ({"prompt": [{"role": "user", "content": 3}]}, "row 2, column 'prompt': []/content changed from string to "),
        ({"prompt": [{"role": "user"}]}, "row 2, column 'prompt': message 0 has no content"),
        ({"prompt": []}, "row 2, column 'prompt': an empty messages list; add a message"),
        ({"prompt": None}, "row 2, column 'prompt': null"),
    ],
)
def test_a_bad_messages_row_is_one_line_naming_file_row_and_column(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": c} for c in CONVERSATIONS[:2]] + [row])
    cfg = load_config("configs/tiny_cpu.yaml", ["data.task=prompts", f"data.prompts={path}"])
    with pytest.raises(DataError) as err:
        read_prompt_texts(cfg)
    assert str(err.value).startswith(f"data.prompts: {path}: {problem}"), str(err.value)
    assert "\n" not in str(err.value)


# --- SFT / RM / DPO rows -------------------------------------------------------------------------------------------


def answer_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_conversational_sft_rows_train_on_what_the_policy_would_generate(tok, tmp_path):
    """Prompt/response messages, and TRL's single `messages` column, give the rendered prompt's tokens and the answer
    as the policy would generate it after that prompt (its text, then EOS)."""
    user, reply = [{"role": "user", "content": "say hello"}], [{"role": "assistant", "content": "hello"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": user, "response": reply}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": user + reply}])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "say hello", "response": "hello"}])
    auto = ChatFormat.from_setting("auto")
    for path in (pairs, chat):
        batch, report = read_tokenized(DatasetSpec(path, "demonstrations"), tok, "sft.data.path", auto)
        assert batch.column("prompt_ids").to_pylist() == [hf_prompt_ids(tok, user)]
        assert batch.column("response_ids").to_pylist() == [answer_ids(tok, "hello")]
    batch, _ = read_tokenized(DatasetSpec(plain, "demonstrations"), tok, "sft.data.path", auto)
    assert batch.column("prompt_ids").to_pylist() == [tok("say hello")["input_ids"]]  # plain text: as before
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": user}])
    with pytest.raises(ConfigError, match=r"^sft.data.path: \S+bad.jsonl: row 0, column 'messages': the conversation"):
        read_tokenized(DatasetSpec(bad, "demonstrations"), tok, "sft.data.path", auto)


def test_conversational_preference_rows(tok, tmp_path):
    rows = [
        {
            "prompt": CONVERSATIONS[2],
            "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "goodbye"}],
        }
    ]
    batch, _ = read_tokenized(
        DatasetSpec(write_jsonl(tmp_path / "prefs.jsonl", rows), "preferences"), tok, "rm.data.path"
    )
    assert batch.column("prompt_ids").to_pylist() == [hf_prompt_ids(tok, CONVERSATIONS[2])]
    assert batch.column("chosen_ids").to_pylist() == [answer_ids(tok, "red")]
    assert batch.column("rejected_ids").to_pylist() == [answer_ids(tok, "goodbye")]
    rows[0]["prompt"] = "name a colour"  # a plain prompt, left untemplated by auto, cannot take message answers
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ConfigError, match=r"^dpo.data.path: \S+: row 0, column 'chosen': a messages list, but the"):
        read_tokenized(DatasetSpec(mixed, "preferences"), tok, "dpo.data.path")


# --- the reward sees what the policy saw ---------------------------------------------------------------------------


def templated_prompt_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for a prompt the tiny template rendered (ends with its generation prompt), 0 otherwise."""
    return [float(p.startswith(("user: ", "system: ")) and p.endswith("</s>\nassistant:")) for p in prompts]


def test_the_reward_function_and_model_see_the_prompt_the_policy_saw(tiny_cfg, tiny_model, tmp_path):
    from rlhf_dist.models.load import load_reward_model, load_tokenizer
    from rlhf_dist.trainers.ppo import prepare
    from rlhf_dist.workers.reward import RewardWorker
    from rlhf_dist.workers.rollout import RolloutWorker

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": c} for c in CONVERSATIONS])
    cfg = tiny_cfg(
        "data.task=prompts",
        f"data.prompts={path}",
        "train.prompts_per_iteration=3",
        "generation.max_new_tokens=4",
        "reward.function=test_chat:templated_prompt_reward",
        f"model.reward={tiny_model}",
    )
    batch = RolloutWorker(cfg).generate(prepare(cfg).next_batch(), iteration=0)
    rewards = RewardWorker(cfg).score(batch).column(S.REWARD).to_numpy()
    tok, rm = load_tokenizer(tiny_model), load_reward_model(tiny_model).eval()
    for i in range(len(batch)):
        conversation = next(c for c in CONVERSATIONS if c[-1]["content"] in batch.column(S.PROMPT_TEXT)[i].as_py())
        ids = hf_prompt_ids(tok, conversation) + batch.column(S.RESPONSE_IDS)[i].as_py()
        assert batch.column(S.PROMPT_IDS)[i].as_py() == hf_prompt_ids(tok, conversation)  # what the policy saw
        with torch.no_grad():
            rm_score = rm(torch.tensor([ids])).logits[0, 0].item()
        # the function's 1.0 says its prompt was the rendered one; the rest is the reward model's score of it
        np.testing.assert_allclose(rewards[i], 1.0 + rm_score, rtol=1e-5, atol=1e-5)
