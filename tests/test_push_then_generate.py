"""The driver's early start of the next generation (``trainers/ppo.py::push_then_generate``), without Ray: what goes
out behind the push, what ``close_iteration`` then leaves alone, and what a push sent again takes back.

The groups, the sampler and the push stand in for the actors (they record what the driver sent); Ray's side of
``after=`` (a call held until the push's answer exists, failing with it) is tested on real actors in
tests/test_role_group.py."""

from types import SimpleNamespace

import pytest

from rlhf_dist.orchestration.phases import Phases
from rlhf_dist.orchestration.schedules import make_schedule
from rlhf_dist.trainers.ppo import PPORun, close_iteration, push_then_generate


class Group:
    """A role group that records the calls sent to it: (role, method, iteration or None, what it waits for)."""

    view_of = None

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __len__(self):
        return 1

    def compute_stats(self, reset=True, after=None):
        self.log.append((self.name, "compute_stats", None, after))
        return SimpleNamespace(refs=[object()])

    def scatter(self, method, prompts, iteration, after=None, **kwargs):
        self.log.append((self.name, method, iteration, after))
        return SimpleNamespace(refs=[object()], prompts=prompts, index=None)

    def chain(self, method, upstream):
        self.log.append((self.name, method, None, "chained"))
        return SimpleNamespace(refs=[object()])


class Sampler:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def next_batch(self):
        self.n += 1
        return f"prompts {self.n}"


class Push:
    """WeightPush's start and finish; ``again``: the push failed once and was sent again."""

    def __init__(self, again):
        self.again, self.name = again, "object_store"

    def start(self, version, phases):
        return SimpleNamespace(version=version, landed=f"landed v{version}")

    def finish(self, push):
        return {"seconds": 0.0, "bytes": 1.0, "again": self.again}


def make_run(cfg, again):
    log = []
    groups = {role: Group(role, log) for role in ("rollout", "reward", "reference", "policy", "critic")}
    run = PPORun(cfg, groups, Sampler(), SimpleNamespace(value=0.0), Push(again))
    run.schedule = make_schedule(cfg, run.start_generation)
    return run, log


def generations(log):
    return [(i, after) for role, method, i, after in log if method == "generate"]


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_the_next_generation_and_its_ledger_go_out_behind_the_push(tiny_cfg, mode):
    run, log = make_run(tiny_cfg(f"train.mode={mode}", "train.iterations=5"), again=False)
    run.schedule.generation(0, 5)  # iteration 0's batch (and one_step_off's iteration 1) in flight
    run.draw_ahead()
    log.clear()
    push_then_generate(run, Phases())
    nxt = 1 if mode == "sync" else 2  # one_step_off had iteration 1 in flight already
    assert log == [
        ("rollout", "compute_stats", None, "landed v1"),
        ("rollout", "generate", nxt, "landed v1"),
    ]
    assert run.ledgers.keys() == {"rollout"}
    run.iteration, run.version = 1, 1
    log.clear()
    ledgers = close_iteration(run)
    # nothing more for the rollout: its ledger and the next generation are out; the others' ledgers go now
    assert not [entry for entry in log if entry[0] == "rollout"]
    assert ledgers.keys() == {"rollout", "reward", "reference", "policy", "critic"}


@pytest.mark.parametrize("mode", ["sync", "one_step_off"])
def test_a_push_sent_again_takes_back_what_waited_for_it_and_the_same_prompts_go_out_again(tiny_cfg, mode):
    run, log = make_run(tiny_cfg(f"train.mode={mode}", "train.iterations=5"), again=True)
    run.schedule.generation(0, 5)
    run.draw_ahead()
    before = run.schedule.in_flight_until(5)
    log.clear()
    push_then_generate(run, Phases())
    nxt = 1 if mode == "sync" else 2
    assert run.ledgers == {}  # the rollout's ledger call failed with the first push: not read
    assert run.schedule.in_flight_until(5) == before  # what was in flight before the push stays
    assert run.drawn == {nxt: f"prompts {nxt + 1}"}  # drawn once (iteration 0 drew the first), kept to be sent again
    run.iteration, run.version = 1, 1
    log.clear()
    close_iteration(run)
    assert ("rollout", "compute_stats", None, None) in log
    assert generations(log) == [(nxt, None)]  # sent again, after the push that landed, on the same prompts
    assert run.schedule.in_flight_until(5)[-1][1].prompts == f"prompts {nxt + 1}"
    assert run.sampler.n == nxt + 1  # no prompts drawn twice
