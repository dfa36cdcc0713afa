"""A client for a remote reward service over HTTP (`reward.endpoint`).

The protocol, one JSON POST per batch of at most ``batch_size`` pairs:

    request:  {"prompts": ["...", ...], "responses": ["...", ...]}       (same length, same order)
    answer:   200, {"rewards": [0.5, -1.2, ...]}                          (one number per response, in order)

Batches go out ``concurrency`` at a time. A POST that times out, cannot connect, or gets HTTP 5xx / 429 is retried
up to ``retries`` times, waiting ``backoff_s``, then twice that, and so on; any other answer that breaks the protocol
(4xx, not JSON, no "rewards", the wrong count, a value that is not a number) is not retried: it would not change.
Every failure is a ``RewardServiceError`` whose message is one line naming the URL, what came back and what was
expected.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import NoReturn

import numpy as np
import requests

PROTOCOL = '{"rewards": [one number per response, in order]}'
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RewardServiceError(RuntimeError):
    """The reward service failed or broke the protocol; the message is one line."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not (timeout, no connection, 5xx/429)."""


class RewardClient:
    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 32,
        concurrency: int = 4,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        name: str = "reward.endpoint",
    ):
        if batch_size < 1 or concurrency < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(
                f"batch_size={batch_size}, concurrency={concurrency} must be >= 1, retries={retries} and "
                f"backoff_s={backoff_s} >= 0, timeout_s={timeout_s} > 0"
            )
        self.url, self.name = url, name
        self.batch_size, self.timeout_s, self.retries, self.backoff_s = batch_size, timeout_s, retries, backoff_s
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward-client")
        self._local = threading.local()  # a requests.Session is not thread-safe: one per pool thread

    @classmethod
    def from_config(cls, reward) -> RewardClient:
        """From the run config's ``reward`` section (``reward.endpoint*``)."""
        return cls(
            reward.endpoint,
            batch_size=reward.endpoint_batch_size,
            concurrency=reward.endpoint_concurrency,
            timeout_s=reward.endpoint_timeout_s,
            retries=reward.endpoint_retries,
            backoff_s=reward.endpoint_backoff_s,
        )

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """One float32 reward per (prompt, response), in order; raises RewardServiceError (one line)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        starts = range(0, len(prompts), self.batch_size)
        futures = [
            self._pool.submit(self._post, prompts[s : s + self.batch_size], responses[s : s + self.batch_size])
            for s in starts
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:  # a failed batch fails the call: the ones not yet sent are not sent
            f.cancel()
        for f in futures:
            if f in done and f.exception() is not None:
                raise f.exception()
        parts = [f.result() for f in futures]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one batch -------------------------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._attempt(prompts, responses)
            except _Retryable as err:
                if attempt + 1 == attempts:
                    raise RewardServiceError(
                        f"{self.name} {self.url}: {err} after {attempts} attempt{'s' * (attempts > 1)} "
                        f"(reward.endpoint_retries={self.retries}); expected HTTP 200 with {PROTOCOL}"
                    ) from None
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _attempt(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        try:
            answer = self._session().post(
                self.url, json={"prompts": prompts, "responses": responses}, timeout=self.timeout_s
            )
        except requests.Timeout:
            raise _Retryable(f"no answer within reward.endpoint_timeout_s={self.timeout_s:g} s") from None
        except requests.ConnectionError as err:
            raise _Retryable(f"cannot connect ({_reason(err)})") from None
        except requests.RequestException as err:  # e.g. the connection dropped mid-answer
            raise _Retryable(f"the request failed ({_reason(err)})") from None
        if answer.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {answer.status_code} {answer.reason} ({_snippet(answer.text)})")
        if answer.status_code != 200:
            self._fail(f"HTTP {answer.status_code} {answer.reason} ({_snippet(answer.text)})")
        try:
            body = answer.json()
        except (ValueError, json.JSONDecodeError):
            self._fail(f"the answer is not JSON ({_snippet(answer.text)})")
        rewards = body.get("rewards") if isinstance(body, dict) else None
        if not isinstance(rewards, list):
            got = f"keys {sorted(body)}" if isinstance(body, dict) else f"a JSON {type(body).__name__}"
            self._fail(f'the answer has no "rewards" list ({got})')
        if len(rewards) != len(prompts):
            self._fail(f"{len(rewards)} rewards for a batch of {len(prompts)} responses")
        for i, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                self._fail(f'"rewards"[{i}] is {json.dumps(r)[:40]}, not a number')
        return np.asarray(rewards, dtype=np.float32)

    def _fail(self, what: str) -> NoReturn:
        raise RewardServiceError(f"{self.name} {self.url}: {what}; expected HTTP 200 with {PROTOCOL}")


def _snippet(text: str, n: int = 80) -> str:
    """The start of a body, on one line."""
    flat = " ".join(text.split())
    return repr(flat[:n] + ("..." if len(flat) > n else "")) if flat else "empty body"


def _reason(err: Exception) -> str:
    """The innermost cause's text (urllib3 wraps 'Connection refused' three levels deep), on one line."""
    while err.__context__ is not None or err.__cause__ is not None:
        err = err.__cause__ or err.__context__
    return " ".join(str(err).split())[:120] or type(err).__name__
