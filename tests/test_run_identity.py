"""Run identity without Ray: one run per output_dir (a flock that dies with its process), a fresh run never starts
over another run's results, a resume never continues another run's checkpoints, pruning keeps to the current run's,
and an output_dir that cannot take the run fails before anything starts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_dist import run_dir
from rlhf_dist.checkpoint import (
    DRIVER_STATE,
    begin_checkpoint,
    checkpoint_identity,
    latest_checkpoint,
    prune,
    save_driver_state,
)
from rlhf_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def make_cfg(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", f"model.policy={Path(out).parent / 'no_model'}", *overrides])


def claim_once(cfg, command="train"):
    with run_dir.claim(cfg, command) as rd:
        return rd


def write_checkpoint(out, iteration, run_id, defining=None, files=("policy/model.pt",)):
    """A checkpoint as save_checkpoint leaves it: learner files, then driver.json naming the run (None: older)."""
    path = Path(out) / "checkpoints" / f"iter_{iteration}"
    for f in files:
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        (path / f).write_text("weights")
    state = {"next_iteration": iteration, "version": iteration, "sampler": {}, "kl_coef": 0.05}
    if run_id is not None:
        state.update(run_id=run_id, defining=defining or {})
    save_driver_state(path, state)
    return path


def one_line_error(fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


HOLDER = textwrap.dedent(
    """
    import sys
    from rlhf_dist import run_dir
    from rlhf_dist.config import load_config
    cfg = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}", f"model.policy={sys.argv[2]}/no_model"])
    with run_dir.claim(cfg, "train"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin, or kills this process
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding output_dir; yields (Popen, output_dir)."""
    out = tmp_path / "busy"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, TINY, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc, out
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---- one run per output_dir ----------------------------------------------------------------------------------------
def test_a_dir_held_by_another_process_is_refused_naming_it_and_taken_once_that_process_dies(holder):
    proc, out = holder
    msg = one_line_error(claim_once, make_cfg(out))
    assert msg.startswith("output_dir: ") and f"pid {proc.pid}" in msg and "train" in msg, msg
    assert "wait for it to end or choose another output_dir" in msg
    proc.kill()  # no clean-up: the kernel drops its flock, the stale holder line stays in .lock
    proc.wait(timeout=30)
    assert str(proc.pid) in (out / run_dir.LOCK).read_text()
    rd = claim_once(make_cfg(out))
    assert json.loads((out / "run.json").read_text())["run_id"] == rd.run_id


def test_a_second_run_through_the_cli_fails_on_one_line_before_ray(holder, capfd):
    import ray

    from rlhf_dist.cli import main

    proc, out = holder
    rc = main(["train", TINY, f"output_dir={out}", f"model.policy={out.parent / 'no_model'}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pid {proc.pid}" in err[0], err
    assert not ray.is_initialized()


def test_one_process_claims_a_dir_for_several_commands_without_locking_itself_out(tmp_path):
    """The pipeline holds its output_dir and claims its stages' runs in it; each driver's claim finds its own."""
    out = tmp_path / "pipe"
    cfg = make_cfg(out)
    with run_dir.claim(cfg, "pipeline") as pipe, run_dir.claim(cfg, "sft") as sft:
        with run_dir.claim(cfg, "sft") as again:  # the stage's driver
            assert again is sft and run_dir.current(out, "sft") is sft
        assert pipe.run_id != sft.run_id
        assert {p.name for p in out.glob("*.run.json")} == {"pipeline.run.json", "sft.run.json"}
    with pytest.raises(RuntimeError, match="not claimed"):
        run_dir.current(out, "sft")
    claim_once(make_cfg(out, "checkpoint.resume=true"), "pipeline")  # all released: the dir is free again


# ---- which run the files belong to ---------------------------------------------------------------------------------
def test_the_manifest_names_the_run_and_a_resume_keeps_its_id_and_adds_an_attempt(tmp_path):
    out = tmp_path / "run"
    first = claim_once(make_cfg(out, "seed=3"))
    m = json.loads((out / "run.json").read_text())
    assert m["run_id"] == first.run_id and m["command"] == "train" and m["seed"] == 3
    assert m["pid"] == os.getpid() and m["host"] and m["started"] and len(m["config_sha256"]) == 64
    assert m["code_version"]["package"] == "0.1.0"
    if (REPO / ".git").exists():
        assert len(m["code_version"]["git_commit"] or "") == 40
    assert set(m["defining"]) == set(run_dir.DEFINING_KEYS["train"]) and m["defining"]["seed"] == 3
    again = claim_once(make_cfg(out, "seed=3", "train.iterations=99", "checkpoint.resume=true"))
    m2 = json.loads((out / "run.json").read_text())
    assert again.run_id == first.run_id == m2["run_id"] and again.attempt == 2 and len(m2["attempts"]) == 2
    assert m2["attempts"][0]["config_sha256"] != m2["attempts"][1]["config_sha256"]  # iterations changed


def test_a_fresh_run_refuses_a_dir_with_another_runs_results_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    old = claim_once(make_cfg(out))
    ckpt = write_checkpoint(out, 4, old.run_id)
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')
    msg = one_line_error(claim_once, make_cfg(out))
    assert msg.startswith("output_dir: ") and old.run_id in msg, msg
    assert "checkpoints, metrics.jsonl" in msg
    assert "checkpoint.resume=true" in msg and "new output_dir" in msg and "checkpoint.overwrite=true" in msg
    assert checkpoint_identity(ckpt)["run_id"] == old.run_id
    assert json.loads((out / "run.json").read_text())["run_id"] == old.run_id


def test_a_fresh_run_refuses_results_written_before_run_identity(tmp_path):
    out = tmp_path / "old"
    write_checkpoint(out, 2, None)
    msg = one_line_error(claim_once, make_cfg(out))
    assert "checkpoints of a run without a manifest" in msg, msg


def test_a_run_that_left_nothing_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    failed = claim_once(make_cfg(out))  # e.g. stopped by a config error before its first iteration
    assert claim_once(make_cfg(out)).run_id != failed.run_id


def test_overwrite_deletes_the_previous_runs_results_only(tmp_path):
    out = tmp_path / "run"
    old = claim_once(make_cfg(out))
    write_checkpoint(out, 2, old.run_id)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "policy").mkdir()
    (out / "policy" / "config.json").write_text("{}")
    (out / "sft.metrics.jsonl").write_text("{}\n")  # another command's results in the same dir
    with run_dir.claim(make_cfg(out, "checkpoint.overwrite=true"), "train") as new:
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
        assert not (out / "policy").exists() and (out / "sft.metrics.jsonl").exists()
    assert new.run_id != old.run_id
    assert json.loads((out / "run.json").read_text())["run_id"] == new.run_id
    (out / "metrics.jsonl").write_text("{}\n")
    # the supervisor resumes a killed driver with resume=true added to the same overrides: the run goes on
    again = claim_once(make_cfg(out, "checkpoint.overwrite=true", "checkpoint.resume=true"))
    assert again.run_id == new.run_id and (out / "metrics.jsonl").exists()


def test_a_resume_whose_defining_keys_disagree_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    claim_once(make_cfg(out, "seed=1", "algo.estimator=gae"))
    changed = make_cfg(
        out, "seed=2", "algo.estimator=reinforce_pp", "roles.critic.num_actors=0", "checkpoint.resume=true"
    )
    msg = one_line_error(claim_once, changed)
    assert msg.startswith("checkpoint.resume: ") and "seed=1, algo.estimator='gae'" in msg, msg
    assert "seed=2, algo.estimator='reinforce_pp'" in msg
    rd = claim_once(make_cfg(out, "seed=1", "algo.estimator=gae", "checkpoint.resume=true", "train.policy_lr=0.5"))
    # the checkpoint carries the keys too: ppo.resume checks it against the run
    ckpt = write_checkpoint(out, 2, rd.run_id, defining={**rd.defining, "data.num_prompts": 7})
    msg = one_line_error(
        run_dir.check_defining, checkpoint_identity(ckpt)["defining"], rd.defining, f"checkpoint {ckpt}"
    )
    assert "data.num_prompts=7" in msg and f"data.num_prompts={rd.defining['data.num_prompts']}" in msg


def test_resume_adopts_a_dir_written_before_run_identity(tmp_path):
    out = tmp_path / "old"
    legacy = write_checkpoint(out, 6, None)
    rd = claim_once(make_cfg(out, "checkpoint.resume=true"))
    assert rd.adopted_legacy
    assert latest_checkpoint(out, run_id=rd.run_id, accept_unowned=rd.adopted_legacy) == legacy
    rd2 = claim_once(make_cfg(out, "checkpoint.resume=true"))  # a later attempt still owns them
    assert rd2.run_id == rd.run_id and rd2.adopted_legacy


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_resume_and_prune_see_only_the_current_runs_checkpoints(tmp_path):
    """The data loss on main: another run's higher-numbered checkpoints made pruning delete this run's and made
    resume continue that run."""
    out = tmp_path / "run"
    mine = [write_checkpoint(out, i, "mine") for i in (2, 4, 6)]
    theirs = [write_checkpoint(out, i, "theirs") for i in (10, 12)]
    legacy = write_checkpoint(out, 20, None)
    assert latest_checkpoint(out, run_id="mine") == mine[-1]
    assert latest_checkpoint(out, run_id="nobody") is None
    prune(out, keep=2, run_id="mine")
    assert [p.exists() for p in mine] == [False, True, True]
    assert all(p.exists() for p in [*theirs, legacy])
    prune(out, keep=1, run_id="new")  # a run without checkpoints deletes nothing
    assert all(p.exists() for p in [*mine[1:], *theirs, legacy])


def test_a_half_written_checkpoint_is_never_resumed_and_the_next_save_replaces_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    done = write_checkpoint(out, 2, "mine")
    crashed = out / "checkpoints" / "iter_4"  # learner files written, driver.json not yet (or only its .tmp)
    (crashed / "policy").mkdir(parents=True)
    (crashed / "policy" / "stale.pt").write_text("half")
    (crashed / (DRIVER_STATE + ".tmp")).write_text('{"run_id": "mi')
    assert latest_checkpoint(out, run_id="mine") == done
    path = begin_checkpoint(out, 4, run_id="mine")
    assert path == crashed and list(path.iterdir()) == []
    save_driver_state(path, {"next_iteration": 4, "run_id": "mine", "defining": {}})
    assert latest_checkpoint(out, run_id="mine") == path

    # a removal cut short (a crash while pruning) leaves an incomplete checkpoint, not a broken complete one
    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_dist.checkpoint.shutil.rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        prune(out, keep=1, run_id="mine")
    assert done.exists() and latest_checkpoint(out, run_id="mine") == path
    assert checkpoint_identity(done) is None


def test_a_save_never_replaces_another_runs_complete_checkpoint(tmp_path):
    theirs = write_checkpoint(tmp_path, 8, "theirs")
    with pytest.raises(RuntimeError, match="of run theirs, not of this run"):
        begin_checkpoint(tmp_path, 8, run_id="mine")
    assert checkpoint_identity(theirs)["run_id"] == "theirs"


# ---- the output_dir can take the run, checked before anything starts ------------------------------------------------
def test_an_unwritable_output_dir_fails_through_the_cli_before_ray(tmp_path, capfd):
    import ray

    from rlhf_dist.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a dir under a regular file cannot be made, also as root (where chmod does not stop writes)
    bad = [blocker / "sub"]
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        bad.append(tmp_path / "ro")
    for out in bad:
        rc = main(["train", TINY, f"output_dir={out}", f"model.policy={tmp_path / 'no_model'}"])
        err = capfd.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"rlhf-dist: error: output_dir: '{out}' is not writable")
    assert not ray.is_initialized()


def test_too_little_free_space_is_refused_naming_free_and_needed_bytes(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    with open(model / "weights.bin", "wb") as f:  # sparse: 80 MiB by size, nothing on disk
        f.truncate(80 * 2**20)
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"model.policy={model}"])
    assert run_dir.need_bytes(cfg) == 160 * 2**20
    free = 150 * 2**20
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda _p: _Usage(free))
    msg = one_line_error(claim_once, cfg)
    assert msg.startswith("output_dir: ") and f"{free} bytes free" in msg and f"needs at least {160 * 2**20}" in msg
    assert not (tmp_path / "run" / "run.json").exists()


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 2 * free, free, free


def test_a_pipeline_stage_that_would_clobber_another_run_fails_before_ray(tmp_path, capfd):
    """The pipeline claims every stage's run up front: a standalone `rlhf-dist sft` left its results in the dir."""
    import ray

    from rlhf_dist.cli import main

    out = tmp_path / "pipe"
    sft = claim_once(make_cfg(out), "sft")
    (out / "sft.metrics.jsonl").write_text("{}\n")
    rc = main(["pipeline", str(REPO / "configs" / "pipeline_tiny_cpu.yaml"), f"output_dir={out}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"holds sft.metrics.jsonl of run {sft.run_id}" in err[0], err
    assert not ray.is_initialized() and not (out / "ppo" / "run.json").exists()
    assert json.loads((out / "sft.run.json").read_text())["run_id"] == sft.run_id
