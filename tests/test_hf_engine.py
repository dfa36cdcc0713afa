"""The Hugging Face generation engine on the tiny model: log-probs against a teacher-forced forward pass, memory that
does not grow with steps x vocab, and a checkpoint generation_config.json that must not change sampling."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_dist.engines.generation.base import SamplingConfig
from rlhf_dist.engines.generation.hf import HFGenerationEngine
from rlhf_dist.models.load import load_causal_lm, load_tokenizer

MAX_NEW = 24
# Varied lengths, so left padding is exercised; ids 4.. are ordinary tokens of the tiny vocabulary.
PROMPTS = [[5, 9, 17], [40], [7, 7, 8, 30, 31, 32, 33, 60, 61], [100, 12], [3 + i for i in range(1, 15)], [250, 251]]


def engine_for(path, eos, batch_size=64, compile=False):
    tok = load_tokenizer(path)
    return HFGenerationEngine(load_causal_lm(path), tok.pad_token_id, eos, batch_size=batch_size, compile=compile)


def many_eos(path):
    """EOS plus every 7th token: most responses stop early, at different steps, so EOS cut-off and padding run."""
    tok = load_tokenizer(path)
    return [tok.eos_token_id, *range(4, len(tok), 7)]


@torch.no_grad()
def teacher_forced(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token, from one unpadded forward pass over prompt + response."""
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def check_against_teacher_forced(engine, out, temperature, rtol=0.0):
    for prompt, ids, lps in zip(PROMPTS, out.response_ids, out.logprobs):
        assert len(ids) == len(lps) > 0
        expected = teacher_forced(engine.model, prompt, ids, temperature)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=rtol)


@pytest.mark.slow
def test_compiled_generation_records_the_logprobs_of_the_weights_it_was_last_given(tiny_model):
    """generation.compile: a compiled forward over a static cache, prompts padded to 16 tokens. Its log-probs equal
    the eager teacher-forced ones (to float32 rounding: the compiled graph sums in another order, 2e-6 relative seen
    on a log-prob of -5.5), and after weights are loaded in place the compiled graph runs them (parameters are
    inputs of the graph, not constants baked in), so a push is never silently ignored."""
    eos = many_eos(tiny_model)
    engine = engine_for(tiny_model, eos, compile=True)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, seed=3)
    before = engine.generate(PROMPTS, sampling)
    check_against_teacher_forced(engine, before, 0.7, rtol=1e-5)
    assert_responses_end_at_eos(before, eos, sampling.max_new_tokens)
    assert "forward" not in vars(engine.model)  # scoring and the learners' path keep the eager forward
    # the same positions, mask, cache and draws as the eager engine (transformers' generate): the same tokens from
    # the same seed, sampled or greedy; top-k stays inside
    eager = engine_for(tiny_model, eos)
    assert before.response_ids == eager.generate(PROMPTS, sampling).response_ids
    greedy = replace(sampling, greedy=True)
    assert engine.generate(PROMPTS, greedy).response_ids == eager.generate(PROMPTS, greedy).response_ids
    truncated = engine.generate(PROMPTS, replace(sampling, top_k=5, top_p=0.9))
    check_against_teacher_forced(engine, truncated, 0.7, rtol=1e-5)
    assert_inside_top_k(engine, truncated, 5)

    with torch.no_grad():
        moved = [(n, p + 0.3 * torch.randn_like(p)) for n, p in engine.model.named_parameters()]
    engine.load_weights(moved)
    after = engine.generate(PROMPTS, sampling)
    check_against_teacher_forced(engine, after, 0.7, rtol=1e-5)
    assert after.response_ids != before.response_ids


@pytest.mark.parametrize("batch_size", [64, 4])
@pytest.mark.parametrize("temperature,greedy", [(1.0, False), (0.7, False), (1.0, True)])
def test_logprobs_equal_teacher_forced(tiny_model, temperature, greedy, batch_size):
    eos = many_eos(tiny_model)
    engine = engine_for(tiny_model, eos, batch_size)
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, seed=3, greedy=greedy)
    out = engine.generate(PROMPTS, sampling)
    check_against_teacher_forced(engine, out, temperature)
    assert engine.effective_sampling(sampling)["temperature"] == temperature
    assert_responses_end_at_eos(out, eos, MAX_NEW)


def test_truncating_warpers_leave_logprobs_untruncated(tiny_model):
    """top-k / top-p shape the sampling, but the log-probs stay the full log_softmax(logits / T)."""
    engine = engine_for(tiny_model, many_eos(tiny_model))
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.8, top_k=5, top_p=0.9, seed=1)
    out = engine.generate(PROMPTS, sampling)
    check_against_teacher_forced(engine, out, 0.8)
    assert_inside_top_k(engine, out, 5)


@torch.no_grad()
def assert_inside_top_k(engine, out, k):
    for prompt, ids in zip(PROMPTS, out.response_ids):
        logits = engine.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        chosen = logits.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert (chosen >= logits.topk(k).values[:, -1]).all()


def assert_responses_end_at_eos(out, eos, max_new):
    lengths = [len(r) for r in out.response_ids]
    assert min(lengths) < max_new, "no response stopped early; the EOS path went untested"
    for ids in out.response_ids:  # a response ends at its first EOS, or runs to the limit
        assert all(t not in eos for t in ids[:-1]) and (ids[-1] in eos or len(ids) == max_new)


def test_generate_never_asks_for_per_step_logits(tiny_model, monkeypatch):
    """output_logits / output_scores keep every step's [B, V] until generate returns: 20 GB at 64 x 512 x 152k."""
    engine = engine_for(tiny_model, load_tokenizer(tiny_model).eos_token_id)
    seen = []
    real = engine.model.generate
    monkeypatch.setattr(engine.model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    engine.generate(PROMPTS, SamplingConfig(max_new_tokens=4))
    (kw,) = seen
    config = kw.get("generation_config")
    for flag in ("output_logits", "output_scores"):
        assert not kw.get(flag) and not getattr(config, flag, False), flag


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from rlhf_dist.engines.generation.base import SamplingConfig
    from rlhf_dist.engines.generation.hf import HFGenerationEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50_000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    engine = HFGenerationEngine(LlamaForCausalLM(config), pad_token_id=0, eos_token_id=0)
    prompts = [[5, 6, 7]] * 8
    engine.generate(prompts, SamplingConfig(max_new_tokens=4))  # warm-up: lazy allocations happen here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=100, seed=1))
    per_mb = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is bytes on macOS, KiB on Linux
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / per_mb
    print(min(len(r) for r in out.response_ids), grown_mb)
""")


def test_peak_memory_does_not_grow_with_steps_times_vocab():
    """8 rows x 100 steps x 50k vocab: each copy of the stacked logits is 160 MB, one step is 1.6 MB. Measured in a
    fresh process (a test process's peak RSS is whatever ran before), with glibc returning freed blocks at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # else reuse of freed heap blocks varies by 100 MB
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    steps, grown_mb = run.stdout.splitlines()[-1].split()
    assert int(steps) > 75, "the rows stopped early; the probe measured too few steps"
    assert float(grown_mb) < 64, f"peak RSS grew {float(grown_mb):.0f} MB during one generate"


def test_checkpoint_generation_config_does_not_leak(tiny_model, tmp_path, monkeypatch, capsys):
    """An instruct checkpoint's generation_config.json (repetition penalty, top-k, n-gram bans) must change nothing:
    the same tokens and log-probs as the same weights without it, and log-probs that match log_softmax(logits / T)."""
    path = tmp_path / "tuned"
    shutil.copytree(tiny_model, path)
    gen_path = path / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text())
    # min_new_tokens bans EOS and suppress_tokens bans more: both are large effects, neither is set by our config.
    gen_cfg.update(
        repetition_penalty=1.5,
        top_k=3,
        no_repeat_ngram_size=2,
        do_sample=True,
        temperature=0.3,
        min_new_tokens=MAX_NEW,
        suppress_tokens=list(range(4, 40)),
    )
    gen_path.write_text(json.dumps(gen_cfg))
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, seed=5)
    eos = many_eos(tiny_model)

    tuned = engine_for(str(path), eos)
    built = []
    real = tuned.model._get_logits_processor  # what generate really runs, to hold the report to it
    monkeypatch.setattr(
        tuned.model, "_get_logits_processor", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1]
    )
    out = tuned.generate(PROMPTS, sampling)
    tuned.generate(PROMPTS, replace(sampling, seed=6))
    printed = capsys.readouterr().out
    plain = engine_for(tiny_model, eos).generate(PROMPTS, sampling)
    assert out.response_ids == plain.response_ids
    torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-6, rtol=0)

    report = tuned.effective_sampling(sampling)
    assert report == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "processors": ["TemperatureLogitsWarper"],
    }
    check_against_teacher_forced(tuned, out, report["temperature"])
    # The recorder comes first and sees raw logits; after it runs exactly what the report names.
    assert [type(p).__name__ for p in built[0]] == ["_LogprobRecorder", *report["processors"]]
    assert printed.count(str(report)) == 1, "print the report once per sampling setting"
