"""The labelling page tested as a person uses it: headless Chromium (Debian's, driven by Playwright) opens the page,
judges 10 pairs with the keyboard (one with a note, one tie, one skip) and undoes the last; a second browser labels
at the same time. The Parquet files then hold exactly those judgements. `.ci/run` installs chromium; without it the
test fails in CI and is skipped elsewhere. RLHF_LABEL_SCREENSHOT=PATH also saves a screenshot of the page there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from label_util import gold_choice, serving, write_pairs

from rlhf_dist.data.labels import read_judgements

KEYS = {"left": ("ArrowLeft", "a"), "right": ("ArrowRight", "l"), "tie": ("ArrowDown", "t"), "skip": ("s", "S")}


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it with apt-get install -y chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield lambda: p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])


def current(page) -> dict:
    return {
        "pair_id": int(page.evaluate("document.body.dataset.pairId")),
        "prompt": page.inner_text("#prompt"),
        "left": page.inner_text("#left"),
        "right": page.inner_text("#right"),
    }


def wait_judged(page, n: int) -> None:
    page.wait_for_function(
        f"document.body.dataset.state === 'ready' && document.body.dataset.judged === '{n}'", timeout=15000
    )


def test_two_browsers_judge_with_the_keyboard_and_undo(tmp_path, chromium):
    from rlhf_dist.label.pairs import read_collected
    from rlhf_dist.label.store import LabelStore

    write_pairs(tmp_path / "pairs.parquet", 60)
    folder = tmp_path / "labels"
    store = LabelStore(
        folder, read_collected(tmp_path / "pairs.parquet"), overlap=0.0, seed=0, policy="tiny", synthetic=True
    )
    browsers = []
    try:
        with serving(store) as base:
            browsers = [chromium(), chromium()]
            ann, bob = (b.new_page(viewport={"width": 1100, "height": 640}) for b in browsers)
            ann.goto(f"{base}/?labeller=ann")
            bob.goto(f"{base}/")  # bob types his name, as a new labeller does
            bob.wait_for_selector("#name", state="visible")
            bob.fill("#name", "bob")
            bob.keyboard.press("Enter")
            expected = {"ann": [], "bob": []}
            for page in (ann, bob):
                wait_judged(page, 0)
            for i in range(10):
                # both browsers press their key before either waits: their requests are in flight together
                for who, page in (("ann", ann), ("bob", bob)):
                    pair = current(page)
                    choice = "tie" if i == 3 else "skip" if i == 5 else gold_choice(pair)
                    note = "close call" if (who, i) == ("ann", 2) else None
                    if note:
                        page.keyboard.press("n")
                        page.keyboard.type(note)
                        page.keyboard.press("Escape")
                    page.keyboard.press(KEYS[choice][i % 2])  # both spellings of each shortcut
                    expected[who].append((pair, choice, note))
                for page in (ann, bob):
                    wait_judged(page, i + 1)
            last = expected["ann"].pop()
            ann.keyboard.press("u")
            wait_judged(ann, 9)
            assert current(ann)["pair_id"] == last[0]["pair_id"]  # the undone pair is shown again
            progress = ann.inner_text("#progress-text")
            assert progress.startswith("you: 8 judged, 1 skipped") and "all: 17 of 60 pairs labelled" in progress
            if os.environ.get("RLHF_LABEL_SCREENSHOT"):
                ann.keyboard.press("n")
                ann.keyboard.type("both fine, left a bit warmer")
                ann.screenshot(path=os.environ["RLHF_LABEL_SCREENSHOT"])
    finally:
        for b in browsers:
            b.close()
        store.close()

    rows = read_judgements(folder).to_pylist()
    for who in ("ann", "bob"):
        got = [r for r in rows if r["labeller_id"] == who]
        assert len(got) == len(expected[who]) == (9 if who == "ann" else 10)
        for r, (pair, choice, note) in zip(got, expected[who]):
            assert r["pair_id"] == pair["pair_id"] and r["note"] == note
            if choice in ("tie", "skip"):
                assert r["verdict"] == choice
            else:
                assert (r["chosen"], r["rejected"]) == (pair[choice], pair["right" if choice == "left" else "left"])
    # overlap=0: the two never judge the same pair, except one that the other skipped (a skip leaves it unlabelled)
    judged = {w: {r["pair_id"] for r in rows if r["labeller_id"] == w} for w in ("ann", "bob")}
    skipped = {r["pair_id"] for r in rows if r["verdict"] == "skip"}
    assert judged["ann"] & judged["bob"] <= skipped
    assert Path(folder / "ann.parquet").exists() and Path(folder / "abstained" / "bob.parquet").exists()
