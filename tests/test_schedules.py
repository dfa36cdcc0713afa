"""The train.mode schedules without Ray: which generation is in flight when, and the version bound they promise."""

import numpy as np
import pytest

from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import make_batch
from rlhf_dist.orchestration.schedules import OneStepOff, Sync


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
    assert [s.batch(i, 3) for i in range(3)] == [0, 1, 2]
    assert log == [("start", 0), ("wait", 0), ("start", 1), ("wait", 1), ("start", 2), ("wait", 2)]
    assert s.in_flight() is None


def test_one_step_off_starts_the_next_generation_before_waiting_for_this_one():
    log = []
    s = OneStepOff(lambda i: Gen(log, i))
    assert s.batch(0, 3) == 0 and s.in_flight() == 1
    assert s.batch(1, 3) == 1 and s.in_flight() == 2
    assert s.batch(2, 3) == 2 and s.in_flight() is None  # nothing generated past the last iteration
    assert log == [("start", 0), ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("wait", 2)]


def test_one_step_off_after_a_resume_generates_the_resumed_iteration_again():
    log = []
    s = OneStepOff(lambda i: Gen(log, i))
    s.batch(0, 10)  # iteration 1 in flight
    assert s.batch(5, 10) == 5  # a resume to iteration 5: the in-flight batch of iteration 1 is not used
    assert log[-3:] == [("start", 5), ("start", 6), ("wait", 5)]


def _batch(versions):
    n = len(versions)
    return make_batch({S.SAMPLE_ID: np.arange(n), S.POLICY_VERSION: np.asarray(versions, np.int64)})


@pytest.mark.parametrize(
    "max_staleness, versions, ok",
    [(0, [4, 4], True), (0, [3, 4], False), (1, [3, 4], True), (1, [2, 4], False), (1, [5], False)],
)
def test_samples_older_than_the_bound_never_reach_the_learner(max_staleness, versions, ok):
    from rlhf_dist.trainers.ppo import check_fresh_weights

    stats = {"logprob_mismatch": float("nan"), "logprob_checked_samples": 0}
    if ok:
        check_fresh_weights(_batch(versions), 4, max_staleness, stats, limit=0.1)
    else:
        with pytest.raises(RuntimeError, match=r"samples carry policy versions .* a rollout actor missed"):
            check_fresh_weights(_batch(versions), 4, max_staleness, stats, limit=0.1)


def test_the_log_prob_alarm_runs_on_samples_of_the_learners_version_only():
    from rlhf_dist.trainers.ppo import check_fresh_weights

    batch = _batch([4])
    check_fresh_weights(batch, 4, 1, {"logprob_mismatch": float("nan"), "logprob_checked_samples": 0}, limit=0.1)
    with pytest.raises(RuntimeError, match=r"log-probs differ by 0\.5000 per token"):
        check_fresh_weights(batch, 4, 1, {"logprob_mismatch": 0.5, "logprob_checked_samples": 1}, limit=0.1)
