"""`rlhf-dist label`: Cohen's kappa against hand-computed values; the store's files, undo, restart and overlap; many
labellers posting at once over real HTTP; the token rule; the CLI; human labels as a preference source of rm/dpo;
pairs sampled on demand. The browser test is tests/test_label_browser.py."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from label_util import call, candidate_pairs, label_all, serving, write_pairs

from rlhf_dist.config import ConfigError
from rlhf_dist.data.labels import ABSTAINED_DIR, read_judgements
from rlhf_dist.data.synthetic import gold_reward
from rlhf_dist.label.agreement import cohens_kappa, overlap_verdicts, summarize

# --- Cohen's kappa ----------------------------------------------------------------------------------------------------


def test_cohens_kappa_matches_hand_computed_values():
    # 50 items, yes/no: both yes 20, first yes second no 5, first no second yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    first = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohens_kappa(first, second) == pytest.approx(0.4)
    # three labels: p_o = 4/6; first has a:3 b:2 tie:1, second a:1 b:3 tie:2, p_e = (3 + 6 + 2) / 36 = 11/36;
    # kappa = (24/36 - 11/36) / (25/36) = 13/25
    assert cohens_kappa(["a", "a", "b", "b", "tie", "a"], ["a", "b", "b", "b", "tie", "tie"]) == pytest.approx(0.52)
    assert cohens_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert cohens_kappa(["a", "b"], ["b", "a"]) == -1.0  # p_o = 0, p_e = 1/2
    assert math.isnan(cohens_kappa(["a", "a"], ["a", "a"]))  # p_e = 1: undefined
    assert math.isnan(cohens_kappa([], []))
    with pytest.raises(ValueError, match="2 labels from the first rater, 1 from the second"):
        cohens_kappa(["a", "b"], ["a"])


# --- the store --------------------------------------------------------------------------------------------------------


def make_store(folder, n=12, overlap=0.0, seed=0, **kw):
    from rlhf_dist.label.pairs import read_collected
    from rlhf_dist.label.store import LabelStore

    path = Path(folder).parent / f"pairs-{n}-{seed}.parquet"
    if not path.exists():
        write_pairs(path, n, seed)
    return LabelStore(folder, read_collected(path), overlap=overlap, seed=seed, policy="tiny", synthetic=True, **kw)


def test_judgements_undo_and_restart(tmp_path):
    folder = tmp_path / "labels"
    store = make_store(folder)
    try:
        shown = []
        view = store.next_pair("ann")
        for choice, note in [("left", "clear"), ("right", None), ("tie", None), ("skip", None), ("left", None)]:
            shown.append((view["pair"], choice))
            view = store.judge("ann", view["pair"]["pair_id"], choice, note)
        undone = store.undo("ann")
        assert undone["undone"] == shown[-1][0]["pair_id"] == undone["pair"]["pair_id"]  # judged again next
        decided = pq.read_table(folder / "ann.parquet").to_pylist()
        abstained = pq.read_table(folder / ABSTAINED_DIR / "ann.parquet").to_pylist()
        # on disk: exactly the first four judgements, the chosen answer is the side the labeller picked
        assert [r["pair_id"] for r in decided] == [shown[0][0]["pair_id"], shown[1][0]["pair_id"]]
        assert decided[0]["chosen"] == shown[0][0]["left"] and decided[0]["rejected"] == shown[0][0]["right"]
        assert decided[1]["chosen"] == shown[1][0]["right"] and decided[0]["note"] == "clear"
        assert [(r["pair_id"], r["verdict"]) for r in abstained] == [
            (shown[2][0]["pair_id"], "tie"),
            (shown[3][0]["pair_id"], "skip"),
        ]
        assert [r["seq"] for r in decided + abstained] == [0, 1, 2, 3]
        assert all(r["labeller_id"] == "ann" and r["judge"] == "human" and r["policy"] == "tiny" for r in decided)
        with pytest.raises(ConfigError, match="is being served by pid"):
            make_store(folder)  # one server per label folder
        before = store.table()
    finally:
        store.close()
    (folder / ".ann.parquet.tmp").write_bytes(b"half a file")  # a write that died before its rename
    store = make_store(folder)
    try:
        assert store.table().equals(before) and not (folder / ".ann.parquet.tmp").exists()
        view = store.next_pair("ann")
        assert view["progress"]["mine"] == 3 and view["progress"]["skipped"] == 1
        assert view["pair"]["pair_id"] not in {p["pair_id"] for p, _ in shown[:4]}
        store.undo("ann")  # what was judged before the restart can be undone after it
        assert read_judgements(folder).to_pylist() == before.to_pylist()[:3]
    finally:
        store.close()


def test_overlap_rate_and_kappa_of_identical_raters(tmp_path):
    store = make_store(tmp_path / "labels", n=400, overlap=0.3)
    try:
        n_each, counts = 60, {}
        for _ in range(n_each):
            for who in ("ann", "bob", "cy", "dee"):
                view = store.next_pair(who)
                pid = view["pair"]["pair_id"]
                counts[pid] = counts.get(pid, 0) + 1
                store.judge(who, pid, "left" if gold_reward("", view["pair"]["left"]) > 0.4 else "right")
        judgements = store.table()
    finally:
        store.close()
    assert max(counts.values()) == 2  # a pair is shown to a second labeller, never a third
    second_looks = sum(c - 1 for c in counts.values()) / (4 * n_each)
    assert abs(second_looks - 0.3) < 4 * math.sqrt(0.3 * 0.7 / (4 * n_each)), second_looks
    # raters who follow the same rule on what they see agree up to the side each saw: kappa is computed over a/b
    first, second = overlap_verdicts(judgements)
    assert len(first) == sum(c == 2 for c in counts.values())
    s = summarize(judgements, total_pairs=400, synthetic=True)
    assert s["overlap_pairs"] == len(first) and s["kappa"] == pytest.approx(cohens_kappa(first, second))
    assert s["per_labeller"] == {"ann": n_each, "bob": n_each, "cy": n_each, "dee": n_each}
    assert s["pairs_labelled"] == len(counts)


# --- over HTTP --------------------------------------------------------------------------------------------------------


def test_many_labellers_posting_at_once_lose_nothing(tmp_path):
    folder = tmp_path / "labels"
    store = make_store(folder, n=300, overlap=0.2)
    labellers = [f"l{i}" for i in range(8)]
    with serving(store) as base:
        with ThreadPoolExecutor(16) as pool:
            # 8 labellers judging 12 pairs each, all at once ...
            runs = [pool.submit(label_all, base, [who], limit=12) for who in labellers]
            # ... while one more posts 10 judgements of its own in parallel (its requests take turns, none is lost)
            pids = [p for p in store.order[-10:]]
            solo = [
                pool.submit(call, f"{base}/api/judge", {"labeller": "zed", "pair_id": p, "choice": "right"})
                for p in pids
            ]
            done = {k: v for r in runs for k, v in r.result().items()}
            assert all(f.result()[0] == 200 for f in solo)
        status, again = call(f"{base}/api/judge", {"labeller": "zed", "pair_id": pids[0], "choice": "left"})
        assert status == 409 and again["error"] == f"pair {pids[0]} is already judged by zed; reload the page"
        status, bad = call(f"{base}/api/judge", {"labeller": "../x", "pair_id": pids[0], "choice": "left"})
        assert status == 400 and bad["error"].startswith("labeller '../x': use 1-64 letters")
        status, summary = call(f"{base}/api/summary")
    store.close()
    on_disk = read_judgements(folder)
    want = {(w, pid, c) for w, rows in done.items() for pid, c, _ in rows} | {("zed", p, "right") for p in pids}
    got = set()
    for r in on_disk.to_pylist():
        side = (
            r["verdict"]
            if r["verdict"] in ("tie", "skip")
            else "left"
            if (r["verdict"] == "a") == r["a_on_left"]
            else "right"
        )
        got.add((r["labeller_id"], r["pair_id"], side))
    assert len(on_disk) == 8 * 12 + 10 and got == want
    assert summary["per_labeller"] == {**{w: 12 for w in labellers}, "zed": 10}
    # agreement with gold: every gold-following labeller agrees on every pair gold decides; zed's blind "right" not
    decided = [
        (r["labeller_id"], gold_reward("", r["chosen"]) > gold_reward("", r["rejected"]))
        for r in on_disk.to_pylist()
        if r["verdict"] in ("a", "b") and gold_reward("", r["chosen"]) != gold_reward("", r["rejected"])
    ]
    assert all(hit for who, hit in decided if who != "zed")
    assert summary["gold_agreement"] == pytest.approx(sum(hit for _, hit in decided) / len(decided))
    assert summary["overlap_pairs"] > 0


def test_token_rule(tmp_path):
    import logging

    from rlhf_dist.label.app import needs_token

    assert not any(map(needs_token, ["127.0.0.1", "127.0.0.2", "localhost", "::1"]))
    assert all(map(needs_token, ["0.0.0.0", "::", "192.168.1.10", "labels.example.org"]))
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    store = make_store(tmp_path / "labels")
    try:
        with serving(store, token="s3cret-token") as base:
            status, body = call(f"{base}/api/next?labeller=ann")
            assert status == 401 and "needs its token" in body["error"]
            status, _ = call(f"{base}/api/next?labeller=ann", headers={"Authorization": "Bearer s3cret-token"})
            assert status == 200
            import urllib.request

            class NoRedirect(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, *args):
                    return None

            opener = urllib.request.build_opener(NoRedirect)
            with pytest.raises(urllib.error.HTTPError) as wrong:
                opener.open(f"{base}/?token=nope")
            assert wrong.value.code == 403
            with pytest.raises(urllib.error.HTTPError) as right:
                opener.open(f"{base}/?token=s3cret-token&labeller=ann")
            assert right.value.code == 303 and right.value.headers["location"] == "/?labeller=ann"
            cookie = right.value.headers["set-cookie"]
            assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
            status, _ = call(f"{base}/api/summary", headers={"Cookie": cookie.split(";")[0]})
            assert status == 200
    finally:
        store.close()
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert not [m for m in records if "s3cret" in m]


# --- the command line -------------------------------------------------------------------------------------------------


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_dist.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def test_cli_serves_resumes_and_summarises(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    table = write_pairs(pairs, 20)
    args = ["configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'run'}", f"label.pairs_path={pairs}", "label.port=0"]
    for round_ in range(2):  # the second server goes on where the first one stopped
        proc = _cli("label", *args)
        try:
            lines = []
            while not any("open http://" in line for line in lines):
                line = proc.stdout.readline()
                assert line, f"the server stopped: {proc.stderr.read()}"
                lines.append(line)
            assert f"{len(table)} pairs" in lines[0] and "token" not in "".join(lines)  # loopback: no token
            base = lines[-1].split("open ")[1].strip().rstrip("/")
            done = label_all(base, ["ann"], limit=3)
            assert len(done["ann"]) == 3
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"pairs labelled: {3 * (round_ + 1)} of {len(table)}" in out
    summary = _cli("label", *args, "--summary")
    out, err = summary.communicate(timeout=60)
    assert summary.returncode == 0 and "per labeller: ann 6" in out and "Cohen's kappa n/a" in out, err
    missing = _cli("label", "configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'run'}", "label.pairs_path=/nope.parquet")
    out, err = missing.communicate(timeout=60)
    assert missing.returncode == 2
    assert err == (
        "rlhf-dist: error: label.pairs_path: '/nope.parquet' does not exist; run `rlhf-dist collect` first or set "
        "label.pairs=sample\n"
    )


# --- human labels as a preference source -----------------------------------------------------------------------------


def test_rm_and_dpo_read_human_simulated_or_both(tmp_path, tiny_cfg):
    from rlhf_dist.trainers.rm import with_preference_sources

    simulated = tmp_path / "simulated.parquet"
    pq.write_table(candidate_pairs(30, seed=7), simulated)
    store = make_store(tmp_path / "labels", n=12)
    try:
        for _ in range(5):
            store.judge("ann", store.next_pair("ann")["pair"]["pair_id"], "left")
        store.judge("ann", store.next_pair("ann")["pair"]["pair_id"], "tie")  # no preference: not trained on
    finally:
        store.close()
    base = [f"rm.data.path={simulated}", f"dpo.data.path={simulated}", f"label.output={tmp_path / 'labels'}"]
    n_sim = len(candidate_pairs(30, seed=7))
    for sources, want in [("[simulated]", n_sim), ("[human]", 5), ("[simulated,human]", n_sim + 5)]:
        for stage in ("rm", "dpo"):
            cfg = with_preference_sources(tiny_cfg(*base, f"label.sources={sources}"), stage)
            table = pq.read_table(getattr(cfg, stage).data.path)
            assert len(table) == want
            if "human" in sources:
                assert table.column("source").to_pylist().count("human") == 5
    empty = tiny_cfg(*base, "label.sources=[human]", f"label.output={tmp_path / 'nobody'}")
    with pytest.raises(ConfigError, match="human is listed but .* holds no decided judgements; label pairs with"):
        with_preference_sources(empty, "rm")


# --- pairs sampled on demand ------------------------------------------------------------------------------------------


@pytest.fixture
def keep_torch_threads():
    """The sampler's rollout role sets this process's torch threads (to its actor's CPUs): restore them afterwards."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_pairs_sampled_on_demand_survive_a_restart(tiny_cfg, keep_torch_threads):
    from rlhf_dist.label.app import open_store

    cfg = tiny_cfg("label.pairs=sample", "label.sample_prompts=6", "collect.num_prompts=12", "label.overlap=0")
    store = open_store(cfg)
    try:
        assert store.next_pair("ann")["waiting"]  # nothing sampled yet: the first chunk is on its way
        deadline = time.monotonic() + 120
        while (view := store.next_pair("ann"))["pair"] is None:
            assert time.monotonic() < deadline and view["error"] is None, view
            time.sleep(0.2)
        first = dict(store.pairs)
        assert 0 < len(first) <= 6 and all(p.version_a == p.version_b == 0 for p in first.values())
        store.judge("ann", view["pair"]["pair_id"], "left")
    finally:
        store.close()
    store = open_store(cfg)
    try:
        assert {k: v for k, v in store.pairs.items() if k in first} == first  # the same pairs after a restart
        assert store.table().num_rows == 1
    finally:
        store.close()


# --- a reward model trained on page labels ----------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_on_page_labels_reaches_the_simulated_labels_accuracy(tmp_path, tiny_cfg):
    """Two scripted labellers judge 400 candidate pairs over HTTP by the gold scorer (10% overlap); an RM trained on
    those judgements (label.sources=[human]) and one trained on the same pairs labelled by the default simulated
    raters (`collect`'s) are scored on the same 150 held-out pairs ordered by gold."""
    from test_pipeline_learners import pairs_batch, run_epochs, start

    from rlhf_dist.data.datasets import write_parquet
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.trainers import offline
    from rlhf_dist.trainers.rm import with_preference_sources
    from rlhf_dist.workers.labeller import LabellerWorker
    from rlhf_dist.workers.rm_learner import RMLearner

    folder = tmp_path / "labels"
    c = tiny_cfg(
        "train.engine=deepspeed", "train.zero_stage=2", "rm.lr=1e-3", f"label.output={folder}", "label.sources=[human]"
    )
    tokenizer = load_tokenizer(c.model.policy)
    store = make_store(folder, n=420, overlap=0.1)
    pairs = [store.pairs[p] for p in store.order]
    with serving(store) as base:
        judged = label_all(base, ["ann", "bob"])
    summary = store.summary()
    store.close()
    assert sum(map(len, judged.values())) > len(pairs) and summary["overlap_pairs"] > 10
    assert summary["kappa"] == pytest.approx(1.0) and summary["gold_agreement"] == pytest.approx(1.0)

    page = with_preference_sources(c, "rm").rm.data.path
    simulated = tmp_path / "simulated.parquet"
    batch = pairs_batch(tokenizer, [p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs])
    write_parquet([LabellerWorker(c).label(batch)], simulated)

    held = candidate_pairs(200, seed=50).to_pylist()
    gold = [(r["prompt"], r["chosen"], r["rejected"]) for r in held]
    gold = [(p, a, b) if gold_reward(p, a) > gold_reward(p, b) else (p, b, a) for p, a, b in gold]
    gold = [g for g in gold if gold_reward(g[0], g[1]) != gold_reward(g[0], g[2])][:150]
    pq.write_table(pa.table(dict(zip(["prompt", "chosen", "rejected"], map(list, zip(*gold))))), tmp_path / "gold.pq")

    def tokens(path):
        return offline.read_tokenized(offline.dataset_spec(c, "rm", "preferences", path), tokenizer, "rm.data.path")[0]

    accuracy = {}
    for name, path in (("page", page), ("simulated", simulated)):
        learner = start(RMLearner, c)
        run_epochs(learner, tokens(path), epochs=2, batch_size=32)
        accuracy[name] = RMLearner.eval_metrics(learner.evaluate(tokens(tmp_path / "gold.pq")))["accuracy"]
    print(f"held-out gold accuracy of the reward model: {accuracy}")
    assert accuracy["page"] > 0.75 and accuracy["page"] >= accuracy["simulated"] - 0.03, accuracy
