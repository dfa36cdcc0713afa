"""What the labelling tests share: candidate pairs of the synthetic task, a real uvicorn server on loopback in a
thread (stopped on the way out, also when the test fails), and a small JSON client."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_dist.data.synthetic import NEUTRAL_WORDS, POSITIVE_WORDS, gold_reward, make_prompts


def random_answers(n: int, seed: int) -> list[str]:
    """3-6 words, each positive with a per-answer probability drawn uniformly: gold scores spread over [0, 1]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.random()
        words = [rng.choice(POSITIVE_WORDS) if rng.random() < p else rng.choice(NEUTRAL_WORDS) for _ in range(5)]
        out.append(" ".join(words[: rng.randint(3, 5)]))
    return out


def candidate_pairs(n: int, seed: int = 0) -> pa.Table:
    """n pairs as `rlhf-dist collect` writes them (prompt, chosen, rejected, pair_id); equal answers left out."""
    prompts = make_prompts(n, seed=seed + 3)
    a, b = random_answers(n, seed + 1), random_answers(n, seed + 2)
    keep = [i for i in range(n) if a[i] != b[i]]
    return pa.table(
        {
            "prompt": [prompts[i] for i in keep],
            "chosen": [a[i] for i in keep],
            "rejected": [b[i] for i in keep],
            "pair_id": pa.array([100 + i for i in keep], pa.int64()),
        }
    )


def write_pairs(path, n: int, seed: int = 0) -> pa.Table:
    table = candidate_pairs(n, seed)
    pq.write_table(table, path)
    return table


def gold_choice(pair: dict) -> str:
    """What the gold scorer says about a pair as the page shows it: left, right or tie."""
    gl, gr = gold_reward(pair["prompt"], pair["left"]), gold_reward(pair["prompt"], pair["right"])
    return "left" if gl > gr else "right" if gr > gl else "tie"


@contextmanager
def serving(store, token: str | None = None):
    """The app on 127.0.0.1 at a free port, in a thread; yields the base URL."""
    import uvicorn

    from rlhf_dist.label.app import bind, create_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(store, token), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the label server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON) of a GET, or of a POST when `body` is given; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def label_all(base: str, labellers: list[str], choose=gold_choice, limit: int | None = None) -> dict[str, list]:
    """Each labeller in turn takes their next pair and posts `choose(pair)` until no pair is left (or `limit`
    judgements each); returns {labeller: [(pair_id, choice, pair), ...]}."""
    done: dict[str, list] = {w: [] for w in labellers}
    active = list(labellers)
    while active:
        for who in list(active):
            status, view = call(f"{base}/api/next?labeller={who}")
            assert status == 200, view
            if view["pair"] is None or (limit is not None and len(done[who]) >= limit):
                active.remove(who)
                continue
            pair, choice = view["pair"], choose(view["pair"])
            status, _ = call(f"{base}/api/judge", {"labeller": who, "pair_id": pair["pair_id"], "choice": choice})
            assert status == 200
            done[who].append((pair["pair_id"], choice, pair))
    return done
