"""Learner rank 0's handle on the rollout engines: vLLM's weight-sync client protocol (``VLLMWeightSyncClient``:
init, start, update, finish) over the rollout workers, so vLLM's trainer-side engines and ours drive them alike.

Ours rather than vLLM's ``RayVLLMWeightSyncClient`` because each rollout engine needs its own NCCL rank offset
(vLLM's sends one init payload to every actor), a payload goes into the object store once for all actors, ``finish``
carries the policy version and collects what every worker reports, and the workers may also be plain in-process
objects (role tests, one-process checks) instead of Ray actors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RolloutClient:
    def __init__(self, workers: Sequence[Any], workers_per_engine: int, timeout_s: float):
        self.workers, self.workers_per_engine, self.timeout_s = list(workers), workers_per_engine, timeout_s
        self.remote = bool(self.workers) and hasattr(getattr(self.workers[0], "generate", None), "remote")
        self.version: int | None = None  # the version the next finish announces
        self.versions: list[int] = []  # what each worker reported at the last finish

    def _all(self, method: str, per_worker: Sequence[tuple]) -> list:
        if not self.remote:
            return [getattr(w, method)(*args) for w, args in zip(self.workers, per_worker)]
        refs = [getattr(w, method).remote(*args) for w, args in zip(self.workers, per_worker)]
        return [r[0] for r in self._get([[ref] for ref in refs], f"{method}()")]

    def _get(self, refs: list[list], what: str) -> list[list]:
        """The results of each worker's calls (in the order sent), waiting at most the timeout for all of them."""
        import ray  # deferred: ray

        try:
            flat = iter(ray.get([ref for mine in refs for ref in mine], timeout=self.timeout_s))
        except ray.exceptions.GetTimeoutError as e:
            late = [
                i for i, mine in enumerate(refs) if len(ray.wait(mine, num_returns=len(mine), timeout=0)[0]) < len(mine)
            ]
            raise TimeoutError(
                f"weight sync: rollout actor(s) {late} did not answer {what} within "
                f"{self.timeout_s:.0f} s (ray.actor_timeout_s)"
            ) from e
        return [[next(flat) for _ in mine] for mine in refs]

    def _same(self, *args: Any) -> list[tuple]:
        return [args] * len(self.workers)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """In an NCCL group engine i's workers take ranks ``rank_offset + i * workers_per_engine`` onwards."""
        if "rank_offset" not in init_info:
            self._all("init_weight_transfer_engine", self._same(init_info))
            return
        first = init_info["rank_offset"]
        self._all(
            "init_weight_transfer_engine",
            [({**init_info, "rank_offset": first + i * self.workers_per_engine},) for i in range(len(self.workers))],
        )

    def start_weight_update(self) -> None:
        self._all("start_weight_update", self._same())

    def update_weights(self, update_info: dict) -> None:
        if self.remote:
            import ray  # deferred: ray

            update_info = ray.put(update_info)  # one copy in the object store, fetched once per node
        self._all("update_weights", self._same(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.versions = self._all("finish_weight_update", self._same(self.version))

    def update(self, update_info: dict) -> None:
        """start, update and finish on every engine, sent together and waited for once: an actor runs one caller's
        calls in the order sent, so this is the same sequence with two round trips fewer (a push waits on them while
        the rollout engines idle). For transports whose two ends must run at once (NCCL) the calls go one by one."""
        if not self.remote:
            self.start_weight_update()
            self.update_weights(update_info)
            self.finish_weight_update()
            return
        import ray  # deferred: ray

        payload = ray.put(update_info)  # one copy in the object store, fetched once per node
        refs = [
            [
                w.start_weight_update.remote(),
                w.update_weights.remote(payload),
                w.finish_weight_update.remote(self.version),
            ]
            for w in self.workers
        ]
        self.versions = [done[-1] for done in self._get(refs, "the weight update (start, update, finish)")]
