"""`rlhf-dist eval`: the pure metrics against hand-computed values, its output folders, its one-line errors, and (slow)
the README's "Bring your own model and data" walkthrough run command for command: init-tiny, a JSONL of prompts, a
reward function, train, eval against the starting model."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch
from rlhf_dist.trainers.eval_metrics import distinct_n, format_table, sample_metrics, win_rate
from rlhf_dist.trainers.evaluate import new_folder

REPO = Path(__file__).resolve().parents[1]


def test_distinct_n_by_hand():
    texts = ["a b a", "b c"]
    # words a b a b c: 3 distinct of 5; bigrams (a b) (b a) (b c): 3 of 3 (not across texts)
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert distinct_n(texts, 2) == pytest.approx(1.0)
    # (the cat) (cat the) (the cat): 2 of 3; trigrams (the cat the) (cat the cat): 2 of 2
    assert distinct_n(["the cat the cat"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["the cat the cat"], 3) == 1.0
    assert distinct_n(["  x  x\tx "], 1) == pytest.approx(1 / 3)
    assert math.isnan(distinct_n(["x", ""], 2)) and math.isnan(distinct_n([], 1))
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(texts, 0)


def test_win_rate_by_hand():
    # win, tie (half), loss; the NaN pair is left out: (1 + 0.5 + 0) / 3
    assert win_rate([1.0, 2.0, 3.0, math.nan], [0.0, 2.0, 4.0, 1.0]) == pytest.approx(0.5)
    assert win_rate([3, 3, 1], [1, 1, 2]) == pytest.approx(2 / 3)
    a, b = np.random.default_rng(0).normal(size=(2, 50)).round(1)  # rounding makes ties
    assert (a == b).any() and win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert math.isnan(win_rate([math.nan], [1.0]))
    with pytest.raises(ValueError, match="paired samples"):
        win_rate([1, 2], [1])


def test_sample_metrics_by_hand():
    sampled = make_batch(
        {
            S.RESPONSE_IDS: [[5, 6], [7]],
            S.ROLLOUT_LOGPROBS: [[-1.0, -2.0], [-0.5]],
            S.RESPONSE_TEXT: ["good good", "fun"],
        }
    )
    scores = make_batch({S.REWARD: [1.0, 0.0], S.GOLD_REWARD: [math.nan, 0.5]})
    ref = make_batch({S.REF_LOGPROBS: [[-1.5, -1.0], [-0.25]]})
    m = sample_metrics(sampled, scores, ref, "k1")
    # k1 = logprob - ref per token: 0.5, -1.0, -0.25 over 3 tokens
    assert m["kl_to_ref"] == pytest.approx(-0.75 / 3)
    # k3 = exp(ref - lp) - 1 - (ref - lp)
    k3 = [math.expm1(d) - d for d in (-0.5, 1.0, 0.25)]
    assert sample_metrics(sampled, scores, ref, "k3")["kl_to_ref"] == pytest.approx(sum(k3) / 3)
    assert m["reward"] == 0.5 and m["gold"] == 0.5 and m["response_len"] == 1.5
    assert m["distinct_1"] == pytest.approx(2 / 3) and m["distinct_2"] == 1.0


def test_table_and_new_folders(tmp_path):
    table = format_table({"policy": {"reward": 0.5, "gold": math.nan}}, (("reward", "reward"), ("gold", "gold")))
    assert table.splitlines()[-1].split() == ["policy", "0.500", "-"]
    a, b = new_folder(tmp_path, "my policy"), new_folder(tmp_path, "my policy")
    assert a != b and a.parent == b.parent == tmp_path and a.name.endswith("my_policy")


def test_bad_policy_dir_is_one_line(tmp_path, capsys):
    from rlhf_dist.cli import main

    rc = main(["eval", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", "--policy", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("rlhf-dist: error: --policy") and "no config.json" in err


def test_bad_eval_prompts_file_is_one_line_naming_the_key(tiny_model, tmp_path, capsys):
    from rlhf_dist.cli import main

    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "the cat sat on"}\n{"question": "no prompt here"}\n')
    argv = ["eval", "configs/tiny_cpu.yaml", f"model.policy={tiny_model}", f"output_dir={tmp_path / 'run'}"]
    errors = []
    for path in (bad, tmp_path / "missing.jsonl"):
        assert main([*argv, f"eval.prompts={path}", "--policy", tiny_model]) == 2
        errors.append(capsys.readouterr().err.strip())
        assert "\n" not in errors[-1] and errors[-1].startswith(f"rlhf-dist: error: eval.prompts: {path}"), errors
    assert "row 1, column 'prompt'" in errors[0], errors[0]
    # Training prompts are not held out: a prompts task needs eval.prompts.
    train_prompts = tmp_path / "train.jsonl"
    train_prompts.write_text('{"prompt": "the cat sat on"}\n')
    assert main([*argv, "data.task=prompts", f"data.prompts={train_prompts}", "--policy", tiny_model]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "rlhf-dist: error: eval.prompts: not set, and every row of data.prompts"
    ), err
    assert not (tmp_path / "run" / "eval").exists()  # failed before making a folder


def walkthrough_script() -> str:
    """The bash blocks of README's "Bring your own model and data", in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Bring your own model and data", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the walkthrough lost its commands"
    return "\n".join(blocks)


@pytest.mark.slow
def test_readme_walkthrough_trains_and_evaluates(tmp_path):
    """The walkthrough's exact commands in a fresh folder: the trained policy beats the model it started from under
    the user's reward function, on held-out prompts, and the eval leaves its table, JSON and plot."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (tmp_path / "walkthrough.sh").write_text(walkthrough_script())
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "walkthrough.sh"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs/byo/policy/config.json").exists()
    (run,) = (tmp_path / "runs/byo/eval").iterdir()
    result = json.loads((run / "eval.json").read_text())
    policy, baseline = result["metrics"]["policy"], result["metrics"]["baseline"]
    assert policy["reward"] > baseline["reward"] + 0.1 and policy["win_rate"] > 0.6, result
    assert policy["win_rate"] + baseline["win_rate"] == pytest.approx(1.0)
    assert policy["gold"] is None  # a prompts file has no gold scorer
    assert policy["kl_to_ref"] > 0 and abs(baseline["kl_to_ref"]) < 1e-4  # the baseline is the reference
    assert result["prompts"] == 32 and (run / "eval.png").stat().st_size > 0
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2 * 32 * 4
    assert "win rate" in proc.stdout and str(run / "eval.json") in proc.stdout
