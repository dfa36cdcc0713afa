"""N Ray actors of one role: create them in a placement group, call a method on all, scatter and gather batches.

The roles themselves are plain classes; this is the only place that turns them into actors.
"""

from __future__ import annotations

import functools
import inspect
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.comm.errors import StaleStateError
from rlhf_dist.data import schema as S
from rlhf_dist.data.batch import concat_in_order, split_balanced
from rlhf_dist.orchestration.placement import ResourceError


class RoleGroupError(RuntimeError):
    """A call on a role's actors went wrong; the message names the role, the actor and the method."""


class ActorTimeoutError(RoleGroupError):
    """An actor did not answer within ``ray.actor_timeout_s``."""


class ActorDiedError(RoleGroupError):
    """An actor's process is gone (killed, crashed, out of memory)."""


class RoleMethodError(RoleGroupError):
    """A role method raised (a user's reward function's ValueError, say); the actor is alive."""


class ActorRestartError(ActorDiedError):
    """An actor died and Ray could not bring it back: its restarts (``ray.max_actor_restarts``) are spent."""


class PlacementTimeoutError(ResourceError):
    """A placement group could not be reserved in time: the cluster has no room for the role's bundles."""


@dataclass
class Bundles:
    """A placement group and, for each actor of a role, the bundle it sits in and the share of it that it takes."""

    pg: PlacementGroup
    indices: list[int]
    num_cpus: float
    num_gpus: float


def reserve(name: str, n: int, num_cpus: float, num_gpus: float, strategy: str, timeout_s: float) -> PlacementGroup:
    """One bundle per actor; PACK keeps a role on as few nodes as possible, SPREAD puts actors on different nodes."""
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementTimeoutError(
            f"role {name}: {n} bundle(s) of {bundle} ({strategy}) could not be placed within {timeout_s:.0f} s; "
            f"the cluster has {ray.cluster_resources()}: lower roles.{name}.num_actors / num_cpus / num_gpus"
        )
    return pg


# -- compute accounting: every actor times its own role methods ---------------------------------------------------
# The driver sees an iteration's wall time; each actor sees the time spent inside its role's methods. The difference
# is orchestration (scheduling, serialisation, object transfer, waiting): rlhf_dist.trainers.timing does the sums.
STATS_METHOD = "compute_stats"
PING_METHOD = "ping"  # answers with the actor's process id once it is up: a new pid means Ray restarted it


class ComputeLedger:
    """Seconds and calls per role method since the last reset, and the process's peak memory over the same span.

    Only the outermost role method is timed (``fit`` calling ``step`` counts once, as ``train``): what the actor was
    asked to do through Ray, not how it is built inside. Peak RSS is per span where Linux lets a process reset its
    high-water mark (/proc/self/clear_refs), else since the process started (``ru_maxrss``); say which in the stats.
    CPU time too, per method and for the whole process: on a machine with fewer cores than busy processes the wall
    time a method takes includes waiting for a core, and what the process burns outside its methods is Ray's
    (receiving calls, serialising results, its threads), the orchestration's cost in CPU rather than in latency.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # process CPU time inside each method (all its threads)
        self.calls: dict[str, int] = {}
        self.process_cpu_at_reset = time.process_time()
        self.spans: list[tuple[str, float, float]] = []  # (method, start, end) in wall-clock seconds: a timeline
        self._depth = threading.local()
        self.peak_scope = "span" if _reset_peak_rss() else "process"

    def enter(self) -> bool:
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        return depth == 0

    def leave(self, method: str, outermost: bool, seconds: float, cpu_seconds: float = 0.0) -> None:
        self._depth.n -= 1
        if outermost:
            self.seconds[method] = self.seconds.get(method, 0.0) + seconds
            self.cpu_seconds[method] = self.cpu_seconds.get(method, 0.0) + cpu_seconds
            self.calls[method] = self.calls.get(method, 0) + 1
            end = time.time()
            self.spans.append((method, end - seconds, end))

    def report(self, reset: bool) -> dict:
        cpu_now = time.process_time()
        out = {
            "seconds": dict(self.seconds),
            "cpu_seconds": dict(self.cpu_seconds),
            # the process's CPU since the last reset outside its role methods: Ray's share of it
            "outside_cpu_s": cpu_now - self.process_cpu_at_reset - sum(self.cpu_seconds.values()),
            "calls": dict(self.calls),
            "spans": list(self.spans),
            "pid": os.getpid(),  # a new one says Ray restarted the actor (``RoleGroup.notice_restarts``)
            "peak_rss_mb": _peak_rss_bytes() / 2**20,
            "peak_rss_scope": self.peak_scope,
            **_gpu_memory_mb(reset),
        }
        if reset:
            self.seconds.clear()
            self.cpu_seconds.clear()
            self.process_cpu_at_reset = cpu_now
            self.calls.clear()
            self.spans.clear()
            if self.peak_scope == "span":
                _reset_peak_rss()
        return out


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _gpu_memory_mb(reset: bool) -> dict[str, float]:
    """The torch allocator's peak on this actor's GPU; torch is not imported here if the role did not import it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    free, total = torch.cuda.mem_get_info()
    out = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "gpu_used_mb": (total - free) / 2**20}
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out


def _ledger(obj) -> ComputeLedger:
    ledger = obj.__dict__.get("_rlhf_compute_ledger")
    if ledger is None:
        ledger = obj.__dict__["_rlhf_compute_ledger"] = ComputeLedger()
    return ledger


AFTER = "_after"  # a keyword every actor method takes and ignores: an ObjectRef the call waits for (``after=``)


def _with_after(fn: Callable) -> inspect.Signature:
    """``fn``'s signature (which Ray checks calls against) plus the keyword ``_after``."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(AFTER, inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params)


def _timed(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def method(self, *args, _after=None, **kwargs):
        ledger = _ledger(self)
        outermost = ledger.enter()
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            return fn(self, *args, **kwargs)
        finally:
            ledger.leave(name, outermost, time.perf_counter() - t0, time.process_time() - cpu0)

    # Ray checks calls against the signature of the fully unwrapped method: this one's, with ``_after``
    method.__signature__ = _with_after(fn)
    del method.__wrapped__
    return method


def _timed_init(init: Callable) -> Callable:
    """The constructor shows in the timeline (``spans``) only, not in the seconds: start-up is not compute of a
    phase. It lets a test see which roles were up before which started."""

    def __init__(self, *args, **kwargs):
        t0 = time.time()
        init(self, *args, **kwargs)
        _ledger(self).spans.append(("__init__", t0, time.time()))

    # the role's own signature, which Ray checks calls against (object.__init__ of a class without one has none)
    return functools.wraps(init)(__init__) if inspect.isfunction(init) else __init__


def _compute_stats(self, reset: bool = True, _after=None) -> dict:
    """Seconds per role method and peak memory since the last reset (by default, resets)."""
    return _ledger(self).report(reset)


def _ping(self) -> int:
    """The actor's process id; answering at all means its constructor has run."""
    return os.getpid()


def timed_role(role_cls: type) -> type:
    """A subclass of ``role_cls`` whose public methods record their wall time, plus ``compute_stats(reset=True)``.

    The role stays a plain class; this is applied only where it becomes an actor. Static and class methods, async
    methods and names starting with ``_`` are left alone.
    """
    namespace: dict[str, Any] = {
        "__doc__": role_cls.__doc__,
        STATS_METHOD: _compute_stats,
        PING_METHOD: _ping,
        "__init__": _timed_init(role_cls.__init__),
    }
    for name in dir(role_cls):
        if name.startswith("_") or name in (STATS_METHOD, PING_METHOD):
            continue
        attr = inspect.getattr_static(role_cls, name)
        if not inspect.isfunction(attr) or inspect.iscoroutinefunction(attr):
            continue
        namespace[name] = _timed(name, attr)
    cls = type(role_cls.__name__, (role_cls,), namespace)
    cls.__qualname__ = role_cls.__qualname__
    return cls


class RoleGroup:
    """The actors of one role, with a timeout on every wait that names the actor that did not answer.

    With ``max_restarts`` > 0 the role heals: Ray restarts a dead actor in its bundle (its constructor runs again),
    ``on_restart(rank)`` gives it back the run's state (a rollout engine gets the current weights), and the call it
    died in is sent again. Only for roles whose calls give the same answer when repeated: rollout (seeds derive
    from the run's seed, the iteration and the rank), reward and reference. A learner never restarts alone: its
    optimizer state and process group are gone with it (the driver resumes the whole run from a checkpoint).
    """

    def __init__(
        self,
        name: str,
        role_cls: type,
        bundles: Bundles,
        make_args: Callable[[int], tuple[tuple, dict]],
        timeout_s: float,
        env_vars: dict[str, str] | None = None,
        max_restarts: int = 0,
    ):
        self.name = name
        self.bundles = bundles
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0  # actors of this group brought back so far
        self.on_restart: Callable[[int], None] | None = None
        remote_cls = ray.remote(timed_role(role_cls))
        self.actors = []
        for rank, bundle_index in enumerate(bundles.indices):
            args, kwargs = make_args(rank)
            self.actors.append(
                remote_cls.options(
                    num_cpus=bundles.num_cpus,
                    num_gpus=bundles.num_gpus,
                    name=None,
                    max_restarts=max_restarts,
                    max_task_retries=0,  # the group decides what to re-run, after the actor has its state back
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=bundles.pg, placement_group_bundle_index=bundle_index
                    ),
                    runtime_env={"env_vars": dict(env_vars or {})},
                ).remote(*args, **kwargs)
            )
        self.pids: list[int | None] = [None] * len(self.actors)  # filled by ``ping``
        self.view_of: str | None = None  # the group whose actors these are, for a second name of the same actors

    def view(self, name: str, methods: Sequence[str]) -> RoleGroup:
        """The same actors under a second role name (a hybrid actor plays policy and rollout): calls, timeouts and
        healing are the owner's; the compute of ``methods`` (what is called through the view) is reported under
        ``name``."""
        other = object.__new__(RoleGroup)
        other.__dict__.update(self.__dict__, name=name, view_of=self.name, view_methods=tuple(methods))
        other.on_restart = None
        return other

    def __len__(self) -> int:
        return len(self.actors)

    # -- healing -----------------------------------------------------------------------------------------------
    def ping(self) -> list[int]:
        """Waits until every actor is up; returns their pids and remembers them (``restarted`` compares to them)."""
        self.pids = Pending(self, PING_METHOD, [a.ping.remote() for a in self.actors]).get(heal=False)
        return self.pids

    def restarted(self) -> list[int]:
        """Ranks whose process changed since the last ``ping`` (Ray restarted them) after healing each one; raises
        ``ActorRestartError`` for an actor that is gone for good."""
        return self.notice_restarts([self._wait_up(rank) for rank in range(len(self.actors))])

    def recover(self, rank: int, err: Exception) -> None:
        """Brings back actor ``rank`` after ``err`` said it died; ``ActorRestartError`` when Ray gave up on it. A
        restart already restored (``notice_restarts``: same pid as last seen) is restored again, not counted again."""
        try:
            pid = self._wait_up(rank)
        except ActorRestartError as gone:
            raise ActorRestartError(f"{gone}; died with {_first_line(err)}") from err
        self.restore(rank, restarted=pid != self.pids[rank])

    def notice_restarts(self, pids: Sequence[int | None]) -> list[int]:
        """Restores and counts each actor whose pid (from its ledger report, or a ping) is not the one last seen:
        Ray restarted it between two calls, so no call of it failed. Every iteration ends with a ledger call on every
        actor, so a restart is seen by the end of the iteration it fell in, whichever calls it fell between. Returns
        the ranks restored."""
        ranks = [
            r for r, pid in enumerate(pids) if pid is not None and self.pids[r] is not None and pid != self.pids[r]
        ]
        for rank in ranks:
            self.restore(rank)
        return ranks

    def refresh(self, rank: int) -> None:
        """Actor ``rank`` said its state is stale (``StaleStateError``): restore it; a new pid counts as a restart."""
        self.restore(rank, restarted=self._wait_up(rank) != self.pids[rank])

    def _wait_up(self, rank: int) -> int:
        """The actor's pid once it answers; Ray answers "unavailable" while it restarts the process."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(self.actors[rank].ping.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            except ray.exceptions.RayActorError as err:
                raise ActorRestartError(f"role {self.name} actor {rank} is gone: {_first_line(err)}") from err
            except ray.exceptions.GetTimeoutError:
                break
        raise ActorTimeoutError(
            f"role {self.name} actor {rank} did not come back within {self.timeout_s:.0f} s (ray.actor_timeout_s)"
        )

    def restore(self, rank: int, restarted: bool = True) -> None:
        """Gives actor ``rank`` the run's state back (``on_restart``); counts it as a restart if Ray restarted it."""
        if restarted:
            self.restarts += 1
            print(f"role {self.name} actor {rank} restarted ({self.restarts} so far); restoring its state", flush=True)
        if self.on_restart is not None:
            self.on_restart(rank)
        self.pids[rank] = self._wait_up(rank)

    # -- calls -------------------------------------------------------------------------------------------------
    def call(self, method: str, *args: Any, after: ray.ObjectRef | None = None, **kwargs: Any) -> Pending:
        """The same call on every actor, all in flight at once; with ``after``, each starts once that exists (Ray
        holds the call until then: no round trip through the driver), after the calls sent to the actor before."""
        return Pending.submit(self, method, [(rank, args, kwargs) for rank in range(len(self.actors))], after=after)

    def compute_stats(self, reset: bool = True, after: ray.ObjectRef | None = None) -> Pending:
        """Every actor's seconds per role method and peak memory since the last reset (see ``ComputeLedger``)."""
        return self.call(STATS_METHOD, reset, after=after)

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Pending:
        return Pending.submit(self, method, [(rank, args, kwargs)])

    def scatter(
        self,
        method: str,
        batch: pa.RecordBatch,
        *args: Any,
        parts: int = 1,
        after: ray.ObjectRef | None = None,
        **kwargs: Any,
    ) -> Pending:
        """Split ``batch`` into one token-balanced shard per actor; ``Pending.batch()`` gathers them in order. With
        ``parts`` > 1 each actor gets that many smaller calls, told apart by a ``part`` keyword (0, 1, ...), so the
        first results land while the rest still run (``Pending.as_completed``). ``after``: as in ``call``."""
        n = len(self.actors) * parts
        if n == 1:  # nothing to balance, nothing to reorder
            return Pending.submit(self, method, [(0, (batch, *args), kwargs)], after=after)
        # Before generation only prompts count; after it, prompts and responses.
        columns = tuple(c for c in (S.PROMPT_IDS, S.RESPONSE_IDS) if c in batch.schema.names)
        shards, index = split_balanced(batch, n, token_columns=columns)
        # Shards go as plain arguments: Ray inlines small ones into the call (no object-store round trip: about half
        # the latency of an explicit ray.put on a small batch) and puts large ones into the object store itself.
        # Shard k goes to actor k % actors as its part k // actors: every actor's first part is sent first.
        calls = [
            (k % len(self.actors), (shard, *args), {**kwargs, "part": k // len(self.actors)} if parts > 1 else kwargs)
            for k, shard in enumerate(shards)
        ]
        return Pending.submit(self, method, calls, index=index, after=after)

    def chain(self, method: str, upstream: Pending) -> Pending:
        """``method`` on each result of ``upstream`` (another group's calls), sent now: Ray runs each call once its
        input exists, so this role starts on a shard as soon as it lands, without a round trip through the driver.
        Result k goes to actor k % actors; ``Pending.batch()`` restores ``upstream``'s row order."""
        calls = [(k % len(self.actors), (ref,), {}) for k, ref in enumerate(upstream.refs)]
        return Pending.submit(self, method, calls, index=upstream.index)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Pending:
    """Calls in flight on a group; waiting is bounded by the group's timeout. A call whose actor died is sent again
    once the group has brought the actor back (``RoleGroup.recover``), so a shard is re-run, not lost."""

    def __init__(
        self, group: RoleGroup, method: str, refs: list, index=None, ranks: Sequence[int] | None = None, calls=None
    ):
        self.group, self.method, self.refs, self.index = group, method, refs, index
        self.ranks = list(ranks) if ranks is not None else list(range(len(refs)))
        self.calls = calls  # (rank, args, kwargs) per ref: what to send again after a restart

    @classmethod
    def submit(
        cls, group: RoleGroup, method: str, calls: list[tuple[int, tuple, dict]], index=None, after=None
    ) -> Pending:
        """Sends ``calls``, each ``(rank, args, kwargs)``; with ``after`` (an ObjectRef), each waits for it (``AFTER``),
        a call sent again after a restart too."""
        if after is not None:
            calls = [(rank, args, {**kwargs, AFTER: after}) for rank, args, kwargs in calls]
        refs = [getattr(group.actors[rank], method).remote(*args, **kwargs) for rank, args, kwargs in calls]
        return cls(group, method, refs, index=index, ranks=[c[0] for c in calls], calls=calls)

    def get(self, heal: bool = True) -> list:
        values: list = [None] * len(self.refs)
        for i, value in self.as_completed(heal):
            values[i] = value
        return values

    def as_completed(self, heal: bool = True) -> Iterator[tuple[int, Any]]:
        """``(i, result of call i)`` in the order the calls finish; a dead actor's call is sent again as in ``get``."""
        deadline = time.monotonic() + self.group.timeout_s
        position = {ref: i for i, ref in enumerate(self.refs)}
        pending = list(self.refs)
        while pending:
            if len(pending) == 1:  # one answer left: wait for it in the get itself (one Ray call, not two)
                done, pending = pending, []
            else:  # one answer at a time: a dead actor surfaces as soon as it is known, not after the others finish
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    self._timed_out(pending, position)
            for ref in done:  # each result is fetched once
                i = position[ref]
                try:
                    value = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except ray.exceptions.GetTimeoutError:
                    self._timed_out([ref], position)
                except ray.exceptions.RayActorError as err:  # before RayTaskError: some are both
                    rank = self.ranks[i]
                    if not (heal and self.calls is not None and self.group.max_restarts):
                        raise ActorDiedError(
                            f"role {self.group.name} actor {rank} died in {self.method}(): {_first_line(err)}"
                        ) from err
                    self.group.recover(rank, err)
                    deadline = self._resend(i, pending, position)
                except ray.exceptions.RayTaskError as err:
                    rank, cause = self.ranks[i], err.cause
                    if isinstance(cause, StaleStateError) and heal and self.calls is not None:
                        # restarted unseen (between calls): it said so itself; restore it and ask again
                        self.group.refresh(rank)
                        deadline = self._resend(i, pending, position)
                        continue
                    raise RoleMethodError(
                        f"role {self.group.name} actor {rank} raised {type(cause).__name__} in {self.method}(): "
                        f"{_first_line(cause)}"
                    ) from err
                else:
                    yield i, value

    def _resend(self, i: int, pending: list, position: dict) -> float:
        """Call ``i`` again on its (restored) actor; returns the new deadline."""
        rank, args, kwargs = self.calls[i]
        retry = getattr(self.group.actors[rank], self.method).remote(*args, **kwargs)
        self.refs[i] = retry
        position[retry] = i
        pending.append(retry)
        return time.monotonic() + self.group.timeout_s

    def _timed_out(self, pending: list, position: dict) -> None:
        late = [self.ranks[position[r]] for r in pending]
        raise ActorTimeoutError(
            f"role {self.group.name}: actor(s) {late} did not answer {self.method}() within "
            f"{self.group.timeout_s:.0f} s (ray.actor_timeout_s); see their logs above"
        )

    def batch(self) -> pa.RecordBatch:
        parts = self.get()
        return concat_in_order(parts, self.index) if self.index is not None else parts[0]


def request_compute_stats(
    groups: dict[str, RoleGroup], reset: bool = True, after: ray.ObjectRef | None = None
) -> dict[str, Pending]:
    """Every actor's ledger call, in flight: each answers once the calls sent to it before are done (and ``after``
    exists), so sending it before the next generation closes the ledger there."""
    return {role: g.compute_stats(reset, after=after) for role, g in groups.items() if g.view_of is None}


def collect_compute_stats(
    groups: dict[str, RoleGroup], requested: dict[str, Pending] | None = None
) -> dict[str, list[dict]]:
    """``{role: [stats of actor 0, actor 1, ...]}`` for every group (``requested`` earlier, or now). A view's actors
    report once, through their owner, the view's methods under the view's name."""
    out = {role: p.get() for role, p in (requested or request_compute_stats(groups)).items()}
    for role, stats in out.items():
        if groups[role].max_restarts:
            groups[role].notice_restarts([s.get("pid") for s in stats])
    for role, g in groups.items():
        if g.view_of is not None:
            both = out[g.view_of]
            # the process's CPU outside any method stays with the owner: counted once
            out[role] = [_only(s, lambda m, g=g: m in g.view_methods, whole_process=False) for s in both]
            out[g.view_of] = [_only(s, lambda m, g=g: m not in g.view_methods) for s in both]
    return out


def _only(stats: dict, keep: Callable[[str], bool], whole_process: bool = True) -> dict:
    """An actor's compute stats restricted to the methods ``keep`` accepts (memory is the process's: kept; its CPU
    outside the methods only with ``whole_process``)."""
    out = dict(stats, seconds={m: t for m, t in stats.get("seconds", {}).items() if keep(m)})
    out["cpu_seconds"] = {m: t for m, t in stats.get("cpu_seconds", {}).items() if keep(m)}
    if not whole_process:
        out.pop("outside_cpu_s", None)
    if "spans" in stats:
        out["spans"] = [span for span in stats["spans"] if keep(span[0])]
    return out
