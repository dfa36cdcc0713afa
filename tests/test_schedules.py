"""The train.mode schedules without Ray: which generation is in flight when, and the version bound they promise."""

import numpy as np
import pytest

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch
from rlhf_dist.orchestration.schedules import Async, OneStepOff, Sync


class Gen:
    """Stands in for a rollout group's Pending: records when it was started and when it was waited for."""

    def __init__(self, log, i):
        self.log, self.i = log, i
        log.append(("start", i))

    def batch(self):
        self.log.append(("wait", self.i))
        return self.i


def test_sync_generates_each_batch_when_it_is_needed():
    log = []
    s = Sync(lambda i: Gen(log, i))
    assert [s.generation(i, 3).batch() for i in range(3)] == [0, 1, 2]
    assert log == [("start", 0), ("wait", 0), ("start", 1), ("wait", 1), ("start", 2), ("wait", 2)]
    assert s.in_flight() is None


def test_one_step_off_starts_the_next_generation_before_waiting_for_this_one():
    log = []
    s = OneStepOff(lambda i: Gen(log, i))
    assert s.generation(0, 3).batch() == 0 and s.in_flight() == 1
    assert s.generation(1, 3).batch() == 1 and s.in_flight() == 2
    assert s.generation(2, 3).batch() == 2 and s.in_flight() is None  # nothing generated past the last iteration
    assert log == [("start", 0), ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("wait", 2)]


def test_one_step_off_after_a_resume_generates_the_resumed_iteration_again():
    log = []
    s = OneStepOff(lambda i: Gen(log, i))
    s.generation(0, 10).batch()  # iteration 1 in flight
    assert s.generation(5, 10).batch() == 5  # a resume to iteration 5: the in-flight batch of iteration 1 is not used
    assert log[-3:] == [("start", 5), ("start", 6), ("wait", 5)]


def test_async_keeps_max_staleness_batches_in_flight_ahead_of_training():
    log = []
    s = Async(lambda i: Gen(log, i), max_staleness=2)
    assert s.generation(0, 5).batch() == 0 and [i for _, i in log] == [0, 1, 2, 0]
    assert s.generation(1, 5).batch() == 1 and log[-2:] == [("start", 3), ("wait", 1)]
    assert s.generation(2, 5).batch() == 2 and log[-2:] == [("start", 4), ("wait", 2)]
    assert s.generation(3, 5).batch() == 3 and s.generation(4, 5).batch() == 4 and s.in_flight() is None
    assert sorted(i for what, i in log if what == "start") == [0, 1, 2, 3, 4]  # each batch generated once


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_a_batch_is_learnt_from_at_most_max_staleness_iterations_after_its_generation_started(max_staleness):
    """The learners' version moves one per iteration: a generation started at iteration s (the engines then hold
    version s) and learnt from at iteration i carries samples i - s versions old. Iterations 0 and 5 are fresh
    (drains for the log-prob alarm): nothing of theirs starts before the push of their own iteration."""
    started, now = {}, [0]

    def start(i):
        started[i] = now[0]
        return Gen([], i)

    s = Async(start, max_staleness, fresh=lambda i: i % 5 == 0)
    for i in range(12):
        now[0] = i
        assert s.generation(i, 12).batch() == i
        assert 0 <= i - started[i] <= max_staleness
    assert started[5] == 5 and started[10] == 10
    assert max(i - started[i] for i in range(12)) == max_staleness  # the buffer does fill up


def test_one_step_off_drains_at_the_fresh_iterations():
    log = []
    s = OneStepOff(lambda i: Gen(log, i), fresh=lambda i: i == 2)
    s.generation(0, 4).batch()
    s.generation(1, 4).batch()  # iteration 2 must come from the weights trained on iteration 1: not started yet
    assert s.in_flight() is None and ("start", 2) not in log
    s.generation(2, 4).batch()
    assert log[-3:] == [("start", 2), ("start", 3), ("wait", 2)]


@pytest.mark.parametrize(
    "make",
    [Sync, OneStepOff, lambda start: Async(start, 2), lambda start: OneStepOff(start, fresh=lambda i: i % 3 == 0)],
)
def test_put_ahead_after_each_push_starts_what_the_next_iteration_would_and_no_earlier_version(make):
    """The driver calls put_ahead(i + 1) once iteration i's push has landed (the engines hold version i + 1): the
    same batches start, each from the same version as when the next iteration's generation starts them, and that
    generation then finds its batch in flight."""

    def schedule_run(put_ahead: bool) -> tuple[dict[int, int], list]:
        version, started, log = [0], {}, []

        def start(i):
            started[i] = version[0]
            return Gen(log, i)

        s = make(start)
        for i in range(7):
            n = len(started)
            assert s.generation(i, 7).batch() == i
            if put_ahead and i > 0:
                assert len(started) == n, "generation had to start a batch itself"
            version[0] = i + 1  # the push after training i
            if put_ahead:
                s.put_ahead(i + 1, 7)
        return started, log

    at_start, _ = schedule_run(False)
    after_push, log = schedule_run(True)
    assert after_push == at_start and sorted(at_start) == list(range(7))  # each batch once, from the same version
    assert log.index(("start", 1)) < log.index(("wait", 1))


@pytest.mark.parametrize(
    "engine, temperature, drained", [("hf", 0.7, [0]), ("vllm", 1.0, [0]), ("vllm", 0.7, [0, 3, 6])]
)
def test_pipelined_schedules_drain_for_the_alarm_only_where_the_engine_cannot_score_after_the_push(
    tiny_cfg, engine, temperature, drained
):
    """Engines that score a sample beside the policy after each checked push (Hugging Face; vLLM at temperature 1,
    where its prompt log-probs are the sampling distribution's) make nothing wait for a fresh batch but iteration
    0; otherwise the batches at the sync.check_every iterations start only after the push."""
    from rlhf_dist.orchestration.schedules import make_schedule

    cfg = tiny_cfg(
        "train.mode=one_step_off",
        "sync.check_every=3",
        f"generation.engine={engine}",
        "generation.vllm_cpu=true",
        f"generation.temperature={temperature}",
    )
    s = make_schedule(cfg, lambda i: Gen([], i))
    assert [i for i in range(8) if s.fresh(i)] == drained


def _batch(versions):
    n = len(versions)
    return make_batch({S.SAMPLE_ID: np.arange(n), S.POLICY_VERSION: np.asarray(versions, np.int64)})


@pytest.mark.parametrize(
    "max_staleness, versions, ok",
    [(0, [4, 4], True), (0, [3, 4], False), (1, [3, 4], True), (1, [2, 4], False), (1, [5], False)],
)
def test_samples_older_than_the_bound_never_reach_the_learner(max_staleness, versions, ok):
    from rlhf_dist.trainers.stale_weights import check_fresh_weights

    stats = {"logprob_mismatch": float("nan"), "logprob_checked_samples": 0}
    if ok:
        check_fresh_weights(_batch(versions), 4, max_staleness, stats, limit=0.1)
    else:
        with pytest.raises(RuntimeError, match=r"samples carry policy versions .* a rollout actor missed"):
            check_fresh_weights(_batch(versions), 4, max_staleness, stats, limit=0.1)


def test_the_log_prob_alarm_runs_on_samples_of_the_learners_version_only():
    from rlhf_dist.trainers.stale_weights import check_fresh_weights

    batch = _batch([4])
    check_fresh_weights(batch, 4, 1, {"logprob_mismatch": float("nan"), "logprob_checked_samples": 0}, limit=0.1)
    with pytest.raises(RuntimeError, match=r"log-probs differ by 0\.5000 per token"):
        check_fresh_weights(batch, 4, 1, {"logprob_mismatch": 0.5, "logprob_checked_samples": 1}, limit=0.1)


class Shards:
    """Stands in for a Pending: its results' refs (a Ray call sent again replaces one)."""

    def __init__(self, refs):
        self.refs = list(refs)


class Scorer:
    """Stands in for a RoleGroup: how many actors, and what was chained on which results."""

    def __init__(self, n):
        self.n, self.chained = n, []

    def __len__(self):
        return self.n

    def chain(self, method, upstream):
        self.chained.append((method, list(upstream.refs)))
        return (method, self.n)


def test_scorers_are_chained_once_and_dropped_when_the_generation_is_sent_again():
    from rlhf_dist.trainers.ppo import FROZEN_SCORERS, InFlight

    groups = {"reward": Scorer(1), "reference": Scorer(3), "policy": Scorer(2)}
    gen = Shards(["g0", "g1"])
    in_flight = InFlight(gen)
    in_flight.chain(groups, list(FROZEN_SCORERS))  # reference has 3 actors for 2 results: left to the driver
    in_flight.chain(groups, [*FROZEN_SCORERS, ("policy", "logprobs")])  # later: only what is new is chained
    assert set(in_flight.scores()) == {"reward", "policy"}
    assert groups["reward"].chained == [("score", ["g0", "g1"])] and groups["reference"].chained == []
    gen.refs[1] = "g1 again"  # a rollout actor restarted: its shard was generated again
    assert in_flight.scores() == {}
    in_flight.chain(groups, list(FROZEN_SCORERS))
    assert groups["reward"].chained == [("score", ["g0", "g1"])]  # nothing chained on the old results again

    streamed = InFlight(Shards(["p0", "p1"]), chainable=False)
    streamed.chain(groups, list(FROZEN_SCORERS))
    assert streamed.scores() == {} and len(groups["reward"].chained) == 1


def test_in_flight_until_names_the_iterations():
    s = OneStepOff(lambda i: f"gen {i}")
    s.put_ahead(0, 5)
    assert s.in_flight_until(0) == [(0, "gen 0")]
    assert s.in_flight_until(1) == [(0, "gen 0"), (1, "gen 1")]


@pytest.mark.parametrize(
    "starts",
    [
        [[0], [1], [2], [3], [4], [5], [6]],  # sync: each push starts the next iteration
        [[0, 1], [2], [3], [4], [5], [6], []],  # one_step_off
        [[0, 1], [2], [], [3, 4], [5], [], [6]],  # drains for a fresh batch: none at some pushes, two at the next
    ],
)
def test_prompts_drawn_ahead_are_the_ones_each_iteration_would_draw(starts):
    """``PPORun.draw_ahead`` while the learners train: every iteration gets the same prompts as without it, a
    checkpoint saves the same sampler state, and at most one iteration is drawn ahead."""
    import pyarrow as pa

    from rlhf_dist.config import load_config
    from rlhf_dist.data.prompts import PromptSampler
    from rlhf_dist.trainers.ppo import PPORun

    cfg = load_config("configs/tiny_cpu.yaml", ["train.iterations=7"])
    table = pa.table({S.PROMPT_IDS: [[i, i + 1] for i in range(10)], "prompt_text": [str(i) for i in range(10)]})

    def run_of() -> PPORun:
        return PPORun(cfg, {}, PromptSampler(table, 4, 2, seed=3), kl_ctl=None, sync=None)

    def checkpoint_state(run: PPORun) -> dict:  # as save_checkpoint takes it
        return run.sampler_before.get(run.iteration, run.sampler.state_dict())

    plain, early = run_of(), run_of()
    for step, started in enumerate(starts):  # the iterations each push starts, in order
        for i in started:
            assert early.prompts(i).equals(plain.prompts(i)), i
        early.draw_ahead()  # while iteration `step` trains
        assert len(early.drawn) <= 1
        plain.iteration = early.iteration = step + 1
        assert checkpoint_state(early) == checkpoint_state(plain), step
