"""`reward.endpoint`: the HTTP reward client against a real server on 127.0.0.1 (good, slow, failing, flaky, wrong
length, not JSON), the reward role using it in-process, and a short PPO job on local Ray scored by it."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest

from rlhf_dist.config import ConfigError, check_paths, load_config
from rlhf_dist.engines.reward_client import RewardClient, RewardServiceError


class RewardServer:
    """A reward service whose behaviour is chosen by the path: /good (reward = float(prompt)), /gold (the synthetic
    task's gold reward), /slow, /fail (500), /flaky (503 twice, then good), /short (one reward too few), /html (200,
    not JSON), /missing (404). ``?delay=S`` holds each answer S seconds; the server counts requests per path and the
    most it held at once."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.pairs: list[tuple[str, str, float]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                url = urlsplit(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests[url.path] = server.requests.get(url.path, 0) + 1
                    n = server.requests[url.path]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    delay = float(url.query.partition("delay=")[2] or 0)
                    time.sleep(delay if url.path != "/slow" else 2.0)
                    self.answer(url.path, n, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def answer(self, path, n, body):
                prompts, responses = body["prompts"], body["responses"]
                if path == "/fail" or (path == "/flaky" and n <= 2):
                    return self.send(500 if path == "/fail" else 503, b"boom\nstack trace line 2", "text/plain")
                if path == "/missing":
                    return self.send(404, b"no such route", "text/plain")
                if path == "/html":
                    return self.send(200, b"<html><body>proxy login</body></html>", "text/html")
                if path == "/gold":
                    from rlhf_dist.data.synthetic import gold_reward

                    rewards = [gold_reward(p, r) for p, r in zip(prompts, responses)]
                    with server.lock:
                        server.pairs += list(zip(prompts, responses, rewards))
                elif path == "/short":
                    rewards = [0.0] * (len(prompts) - 1)
                else:
                    rewards = [float(p) for p in prompts]
                self.send(200, json.dumps({"rewards": rewards}).encode(), "application/json")

            def send(self, status, data, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # a client that timed out has gone: writing to it fails quietly
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = RewardServer()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


def _prompts(n):
    return [str(i) for i in range(n)], [f"response {i}" for i in range(n)]


def _one_line_error(client, n=4) -> str:
    with pytest.raises(RewardServiceError) as err, client:
        client.score(*_prompts(n))
    message = str(err.value)
    assert "\n" not in message and client.url in message and "expected HTTP 200" in message, message
    return message


def test_batches_in_order_and_bounded_concurrency(server):
    with RewardClient(server.url("/good?delay=0.15"), batch_size=2, concurrency=2) as client:
        t0 = time.perf_counter()
        rewards = client.score(*_prompts(8))
        elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(rewards, np.arange(8, dtype=np.float32))
    assert rewards.dtype == np.float32
    assert server.requests["/good"] == 4 and server.max_in_flight == 2
    assert elapsed >= 2 * 0.15  # 4 batches, 2 at a time
    with RewardClient(server.url("/good?delay=0.15"), batch_size=2, concurrency=8) as client:
        client.score(*_prompts(8))
    assert server.max_in_flight == 4  # every batch in flight at once
    with RewardClient(server.url("/good"), batch_size=3) as client:
        assert client.score([], []).shape == (0,)
        np.testing.assert_array_equal(client.score(*_prompts(7)), np.arange(7))


def test_slow_service_times_out_retries_then_one_line(server):
    client = RewardClient(server.url("/slow"), batch_size=4, timeout_s=0.2, retries=2, backoff_s=0.05)
    t0 = time.perf_counter()
    message = _one_line_error(client)
    # three attempts of 0.2 s, with 0.05 s and 0.1 s of back-off between them
    assert 0.6 + 0.15 <= time.perf_counter() - t0 < 2.0
    assert "no answer within reward.endpoint_timeout_s=0.2 s after 3 attempts" in message, message
    assert server.requests["/slow"] == 3


def test_failing_service_retries_then_names_status_and_url(server):
    message = _one_line_error(RewardClient(server.url("/fail"), retries=3, backoff_s=0.01))
    assert server.requests["/fail"] == 4
    assert "HTTP 500 Internal Server Error" in message and "after 4 attempts" in message, message
    assert "'boom stack trace line 2'" in message  # the body's start, on the one line


def test_flaky_service_recovers_with_back_off(server):
    with RewardClient(server.url("/flaky"), retries=2, backoff_s=0.05) as client:
        t0 = time.perf_counter()
        np.testing.assert_array_equal(client.score(*_prompts(3)), [0, 1, 2])
    assert server.requests["/flaky"] == 3 and time.perf_counter() - t0 >= 0.05 + 0.1


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/short", "3 rewards for a batch of 4 responses"),
        ("/html", "the answer is not JSON ('<html><body>proxy login</body></html>')"),
        ("/missing", "HTTP 404 Not Found ('no such route')"),
    ],
)
def test_protocol_errors_are_not_retried(server, path, expected):
    message = _one_line_error(RewardClient(server.url(path), retries=3, backoff_s=0.01))
    assert expected in message, message
    assert server.requests[path] == 1


def test_no_service_listening(server):
    url = server.url("/good")
    server.httpd.shutdown()
    server.httpd.server_close()  # the port is closed now: connection refused
    message = _one_line_error(RewardClient(url, retries=1, backoff_s=0.01))
    assert "cannot connect" in message and "after 2 attempts" in message, message


def test_an_endpoint_nobody_listens_on_fails_before_any_actor_starts(server, tiny_model, tmp_path, capsys):
    from rlhf_dist.cli import main

    check_paths(load_config("configs/tiny_cpu.yaml", [f"reward.endpoint={server.url('/good')}"]))  # listening: fine
    closed = server.url("/good")
    server.httpd.shutdown()
    server.httpd.server_close()
    argv = ["train", "configs/tiny_cpu.yaml", f"model.policy={tiny_model}", f"output_dir={tmp_path / 'run'}"]
    for url, problem in (
        (closed, "nothing accepts a connection at 127.0.0.1:"),
        ("http://no-such-host.invalid/x", "cannot resolve the host 'no-such-host.invalid'"),
    ):
        assert main([*argv, f"reward.endpoint={url}"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"rlhf-dist: error: reward.endpoint: {url}: {problem}"), line
        assert line.endswith("start the reward service first or fix the URL"), line
    assert not (tmp_path / "run").exists()  # failed before the run claimed its folder or Ray started
    assert not server.requests  # a connection only: nothing was POSTed


def test_config_checks_the_endpoint(tiny_model):
    cfg = load_config("configs/tiny_cpu.yaml", ["reward.function=null", "reward.endpoint=http://127.0.0.1:9/score"])
    assert cfg.reward.endpoint == "http://127.0.0.1:9/score"  # a reward source on its own
    for bad in ("127.0.0.1:8000/score", "ftp://host/x", "http:///score", "http://host:port/score"):
        with pytest.raises(ConfigError) as err:
            load_config("configs/tiny_cpu.yaml", [f"reward.endpoint={bad}"])
        assert str(err.value).startswith("reward.endpoint:") and "http://127.0.0.1:8000/score" in str(err.value)
    with pytest.raises(ConfigError, match="reward.endpoint=http://HOST:PORT/PATH"):
        load_config("configs/tiny_cpu.yaml", ["reward.function=null"])
    with pytest.raises(ConfigError, match="reward.endpoint_concurrency"):
        load_config("configs/tiny_cpu.yaml", ["reward.endpoint_concurrency=0"])


def test_reward_role_adds_the_weighted_service_score(server, tiny_cfg):
    """In-process: reward = function + endpoint_weight * service, and the service's errors reach the caller."""
    from rlhf_dist.data import schema as S
    from rlhf_dist.data.batch import make_batch
    from rlhf_dist.data.synthetic import make_prompts, preference_reward
    from rlhf_dist.workers.reward import RewardWorker

    prompts = make_prompts(6, seed=3)
    responses = ["a b c", "", "the cat", "x", "one two three four", "z z"]
    batch = make_batch({S.PROMPT_TEXT: prompts, S.RESPONSE_TEXT: responses})
    worker = RewardWorker(tiny_cfg(f"reward.endpoint={server.url('/gold')}", "reward.endpoint_weight=2"))
    out = worker.score(batch)
    gold = out.column(S.GOLD_REWARD).to_numpy()
    expected = np.asarray(preference_reward(prompts, responses), np.float32) + 2 * gold
    np.testing.assert_allclose(out.column(S.REWARD).to_numpy(), expected, rtol=1e-6)
    assert [r for _, _, r in server.pairs] == pytest.approx(gold.tolist())

    bad = RewardWorker(tiny_cfg(f"reward.endpoint={server.url('/short')}"))
    with pytest.raises(RewardServiceError, match="5 rewards for a batch of 6 responses"):
        bad.score(batch)


@pytest.mark.slow
def test_ppo_job_scored_by_the_service(server, tiny_cfg, local_ray):
    """Two PPO iterations on local Ray whose only reward source is the service (it answers with the synthetic task's
    gold reward): every sample went through it, and the run's reward is what it answered."""
    from rlhf_dist.trainers.ppo import run

    cfg = tiny_cfg(
        "reward.function=null",
        f"reward.endpoint={server.url('/gold')}",
        "reward.endpoint_batch_size=3",
        "train.iterations=2",
        "train.prompts_per_iteration=8",
        "train.engine=torch",
        "train.ppo_epochs=1",
        "train.mini_batches=1",
        "generation.max_new_tokens=6",
        "algo.estimator=grpo",
        "generation.samples_per_prompt=2",
        "roles.critic.num_actors=0",
        "ray.num_cpus=null",
        "logging.plot=false",
        "checkpoint.save_final=false",
    )
    summary = run(cfg)
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    assert len(rows) == 2 and len(server.pairs) == 2 * 16
    assert server.requests["/gold"] == 2 * math.ceil(16 / 3)
    for row in rows:
        assert row["reward_mean"] == pytest.approx(row["gold_reward_mean"], abs=1e-6)
    assert np.mean([r for _, _, r in server.pairs]) == pytest.approx(np.mean([r["reward_mean"] for r in rows]))
