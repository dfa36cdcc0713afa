"""The tiny model, local loading, the critic, and per-token log-probs checked against per-row reference runs."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rlhf_dist.data import synthetic
from rlhf_dist.data.batch import Sequences
from rlhf_dist.models import tiny
from rlhf_dist.models.load import load_causal_lm, load_critic, load_reward_model, load_tokenizer
from rlhf_dist.models.logprobs import response_logprobs, response_values, sequence_scores
from rlhf_dist.models.tiny import build_tiny
from rlhf_dist.models.value_head import VALUE_HEAD_FILE, CriticModel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


# ---------------------------------------------------------------- build


def test_build_reloads_to_the_seeded_init(tiny_dir):
    """from_pretrained gives exactly the model that LlamaForCausalLM(config) draws from the seed."""
    config = AutoConfig.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    expected = LlamaForCausalLM(config).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert type(loaded) is LlamaForCausalLM
    assert 50_000 < sum(p.numel() for p in loaded.parameters()) < 5_000_000
    input_ids = torch.randint(4, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected(input_ids).logits)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert (loaded.generation_config.eos_token_id, loaded.generation_config.pad_token_id) == (2, 3)


def test_build_is_deterministic_per_seed(tiny_dir, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    other = build_tiny(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    # the tokenizer does not depend on the weight seed, so models of different seeds share token ids
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_build_is_idempotent_and_refuses_to_clobber(tmp_path):
    out = build_tiny(tmp_path / "m", seed=0)
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert build_tiny(tmp_path / "m", seed=0) == out
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp  # untouched
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_tiny(tmp_path / "m", seed=1)
    rebuilt = build_tiny(tmp_path / "m", seed=1, overwrite=True)
    assert json.loads((rebuilt / tiny.MARKER).read_text())["seed"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete tiny model"):
        build_tiny(foreign)
    (tmp_path / "empty").mkdir()
    assert tiny._is_complete(build_tiny(tmp_path / "empty"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "m"]  # no temp dirs left


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "LlamaForCausalLM", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- tokenizer and loading


def test_tokenizer_round_trips_synthetic_text(tiny_dir, tokenizer):
    assert isinstance(AutoTokenizer.from_pretrained(tiny_dir), type(tokenizer))
    assert tokenizer.padding_side == "left"
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    for text in synthetic.corpus(50, seed=7) + synthetic.make_prompts(50, seed=7) + ["Hello, World! 42 (x+y)"]:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    for word in synthetic.VOCABULARY:  # one token per task word: what makes the task learnable
        assert len(tokenizer(word).input_ids) == 1, word
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat sat on"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: the cat sat on</s>\nassistant:"


def test_load_errors_name_the_path_and_the_fix(tmp_path, tiny_dir):
    missing = tmp_path / "nowhere"
    for load in (load_tokenizer, load_causal_lm, load_reward_model, load_critic):
        with pytest.raises(FileNotFoundError, match="init-tiny") as err:
            load(missing)
        assert str(missing) in str(err.value)
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(tmp_path / "weights_only")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_dir / "config.json", no_tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(no_tokenizer)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_causal_lm(tiny_dir, dtype="fp8")


def test_load_tokenizer_supplies_a_missing_pad_token(tiny_dir, tmp_path):
    bare = AutoTokenizer.from_pretrained(tiny_dir)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    shutil.copy(tiny_dir / "config.json", tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    padded = load_tokenizer(tmp_path, padding_side="right")
    assert padded.pad_token == "</s>" and padded.padding_side == "right"


def test_load_causal_lm_dtype(tiny_dir):
    model = load_causal_lm(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


# ---------------------------------------------------------------- joined sequences and per-row references


def joined(rows: list[tuple[list[int], list[int]]], pad: int):
    """The contract's right-padded layout, built by hand: (input_ids, attention_mask, position_ids,
    response_index, response_ids, response_mask, last_index)."""
    B = len(rows)
    L = max(len(p) + len(r) for p, r in rows)
    T = max(len(r) for _, r in rows)
    input_ids = torch.full((B, L), pad)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_index = torch.zeros(B, T, dtype=torch.long)
    response_ids = torch.full((B, T), pad)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    last_index = torch.zeros(B, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        attention_mask[i, :n] = 1
        response_index[i, : len(r)] = torch.arange(len(p) - 1, n - 1)
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = True
        last_index[i] = n - 1
    position_ids = torch.arange(L).expand(B, L)
    return input_ids, attention_mask, position_ids, response_index, response_ids, response_mask, last_index


def joined_sequences(rows: list[tuple[list[int], list[int]]], pad: int) -> Sequences:
    """`joined` as the `Sequences` the model functions take (position_ids 0 on pads, as the contract has them);
    the response index and tokens it derives must be the hand-built ones."""
    input_ids, attention_mask, position_ids, response_index, response_ids, response_mask, _ = joined(rows, pad)
    seqs = Sequences(
        input_ids,
        attention_mask,
        position_ids * attention_mask,
        torch.tensor([len(p) for p, _ in rows]),
        torch.tensor([len(r) for _, r in rows]),
        response_mask,
    )
    assert torch.equal(seqs.response_index(), response_index)
    assert torch.equal(seqs.response_tokens()[response_mask], response_ids[response_mask])
    return seqs


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Rows of different lengths: the longest row, an empty response, a one-token response, one ending in eos."""
    encode = lambda text: tokenizer(text).input_ids  # noqa: E731
    return [
        (encode("the cat sat on the"), encode("happy kind warm dog near a bright hill")),
        (encode("my friend saw a"), []),
        (encode("our teacher wrote a long letter to the farmer and"), encode("smile")),
        (encode("a dog"), encode("good fun") + [tokenizer.eos_token_id]),
    ]


def per_row_logprobs(model, rows, temperature):
    """Independent reference: each row alone, unpadded, log_softmax over the full logits, positions by hand."""
    logprobs, entropies = [], []
    with torch.no_grad():
        for prompt, response in rows:
            logits = model(torch.tensor([prompt + response])).logits[0].double() / temperature
            log_p = torch.log_softmax(logits, -1)
            positions = [len(prompt) + t - 1 for t in range(len(response))]
            logprobs.append([log_p[pos, tok].item() for pos, tok in zip(positions, response)])
            entropies.append([-(log_p[pos].exp() * log_p[pos]).sum().item() for pos in positions])
    return logprobs, entropies


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_per_row_runs(tiny_dir, tokenizer, rows, temperature):
    model = load_causal_lm(tiny_dir)
    seqs = joined_sequences(rows, tokenizer.pad_token_id)
    response_mask = seqs.response_mask
    # what the model counts when it is given no position_ids: 0..L-1 on every row, pads included
    counted = dataclasses.replace(seqs, position_ids=torch.arange(seqs.input_ids.shape[1]).expand_as(seqs.input_ids))
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, seqs, temperature, return_entropy=True)
        without_positions = response_logprobs(model, counted, temperature)
    assert logprobs.shape == entropy.shape == response_mask.shape and logprobs.dtype == torch.float32
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    expected_lp, expected_ent = per_row_logprobs(model, rows, temperature)
    for i, (lp, ent) in enumerate(zip(expected_lp, expected_ent)):
        n = len(lp)
        assert not response_mask[i, n:].any()
        torch.testing.assert_close(logprobs[i, :n].double(), torch.tensor(lp, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n].double(), torch.tensor(ent, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(without_positions[response_mask], logprobs[response_mask], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(model, seqs, 0.0)


def test_response_values_match_per_row_runs(tiny_dir, tokenizer, rows):
    critic = load_critic(tiny_dir)
    with torch.no_grad():
        critic.value_head.weight.normal_(generator=torch.Generator().manual_seed(0))
        critic.value_head.bias.fill_(0.25)
    seqs = joined_sequences(rows, tokenizer.pad_token_id)
    response_mask = seqs.response_mask
    with torch.no_grad():
        values = response_values(critic, seqs)
        for i, (prompt, response) in enumerate(rows):
            row = torch.tensor([prompt + response])
            hidden = critic.backbone(row).last_hidden_state[0]
            expected = hidden[len(prompt) - 1 : len(prompt) + len(response) - 1] @ critic.value_head.weight[0] + 0.25
            torch.testing.assert_close(values[i, : len(response)], expected, atol=1e-5, rtol=0)
    assert values.shape == response_mask.shape and values.dtype == torch.float32


def test_sequence_scores_read_the_last_real_token(tiny_dir, tokenizer, rows):
    reward_model = load_reward_model(tiny_dir)
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id and reward_model.config.num_labels == 1
    # the fresh score head is drawn from the seed, so every worker starts from the same one
    assert torch.equal(reward_model.score.weight, load_reward_model(tiny_dir).score.weight)
    assert not torch.equal(reward_model.score.weight, load_reward_model(tiny_dir, seed=1).score.weight)
    ids, mask, pos, _, _, _, last_index = joined(rows, tokenizer.pad_token_id)

    class Wrapped(torch.nn.Module):  # what DeepSpeed / DDP hand back: the model sits in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    with torch.no_grad():
        scores = sequence_scores(reward_model, ids, mask, last_index, pos)
        wrapped_scores = sequence_scores(Wrapped(reward_model), ids, mask, last_index, pos)
        # Hugging Face's own pooling on an unpadded row is its last token: an independent reference
        expected = torch.stack([reward_model(torch.tensor([p + r])).logits[0, 0] for p, r in rows])
    assert scores.shape == (len(rows),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped_scores, scores, atol=0, rtol=0)
    with pytest.raises(TypeError, match="no `score` head"):
        sequence_scores(load_causal_lm(tiny_dir), ids, mask, last_index)


# ---------------------------------------------------------------- critic on disk


def test_critic_round_trip(tiny_dir, tmp_path):
    fresh = load_critic(tiny_dir)
    assert not fresh.value_head.weight.any() and not fresh.value_head.bias.any()  # zero head from a plain LM
    lm = load_causal_lm(tiny_dir)
    assert torch.equal(fresh.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    with torch.no_grad():
        fresh.value_head.weight.normal_(generator=torch.Generator().manual_seed(3))
        fresh.value_head.bias.fill_(-0.5)
    fresh.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / VALUE_HEAD_FILE).is_file()
    reloaded = load_critic(tmp_path / "critic")
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask), fresh(ids, mask))
    assert isinstance(reloaded, CriticModel) and isinstance(reloaded, torch.nn.Module)
    assert load_critic(tmp_path / "critic", dtype="bfloat16").value_head.weight.dtype == torch.bfloat16
    wider = CriticModel(fresh.backbone, torch.nn.Linear(fresh.config.hidden_size + 1, 1))
    wider.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="saved with another backbone"):
        load_critic(tmp_path / "bad")


# ---------------------------------------------------------------- the task is learnable from a random init


def test_random_init_policy_has_a_low_but_nonzero_gold_rate(tiny_dir, tokenizer):
    model = load_causal_lm(tiny_dir)
    prompts = synthetic.make_prompts(64, seed=0)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, max_new_tokens=16, top_k=0, top_p=1.0, temperature=1.0)
    responses = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    gold = [synthetic.gold_reward(p, r) for p, r in zip(prompts, responses)]
    mean = sum(gold) / len(gold)
    assert 0.03 < mean < 0.3, (mean, responses[:4])
    assert sum(g > 0 for g in gold) >= 16  # many samples carry signal for PPO
    # and the optimum is reachable: distinct positive words decode from single tokens to a perfect score
    best = [tokenizer(w).input_ids[0] for w in synthetic.POSITIVE_WORDS[:8]]
    assert synthetic.gold_reward("", tokenizer.decode(best)) == 1.0


def test_critic_from_a_reward_model_starts_from_its_score_head(tiny_dir, tokenizer, rows, tmp_path):
    """As in OpenRLHF: a critic loaded from a scalar reward model keeps its backbone and takes the score head as the
    value head, so its first values are the reward model's per-token scores."""
    reward_model = load_reward_model(tiny_dir, seed=7)
    with torch.no_grad():  # a backbone that differs from the tiny LM's, so the test sees which one was loaded
        reward_model.model.norm.weight.mul_(1.5)
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    critic = load_critic(tmp_path / "rm")
    assert reward_model.score.bias is None  # Llama's score head: the value head's bias stays 0
    assert torch.equal(critic.value_head.weight, reward_model.score.weight) and not critic.value_head.bias.any()
    ids, mask, pos, index, _, response_mask, _ = joined(rows, tokenizer.pad_token_id)
    seqs = joined_sequences(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        values = response_values(critic, seqs)
        # the reward model's own path, one response position at a time, as if each were the last token
        scores = torch.stack(
            [sequence_scores(reward_model, ids, mask, index[:, t], pos) for t in range(index.shape[1])], dim=1
        )
    assert values.abs()[response_mask].min() > 0
    torch.testing.assert_close(values[response_mask], scores[response_mask], atol=1e-5, rtol=0)

    # the critic saves as a critic (backbone + value head) and reloads to the same values
    critic.save_pretrained(tmp_path / "critic")
    with torch.no_grad():
        assert torch.equal(response_values(load_critic(tmp_path / "critic"), seqs), values)


def test_critic_from_a_classifier_with_two_labels_starts_at_zero(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2).save_pretrained(tmp_path / "cls")
    critic = load_critic(tmp_path / "cls")
    assert not critic.value_head.weight.any() and not critic.value_head.bias.any()
