"""The labelling server's state: which pair each labeller sees next, and every judgement, on disk as it is made.

Each labeller's judgements are rewritten to `<folder>/<labeller>.parquet` (decided) or `abstained/<labeller>.parquet`
(ties, skips) after every judgement and undo, through a temp file and a rename: a file holds the labeller's state
after one request or the one before, never half. Requests of one labeller take turns (a lock each), so the file a
request writes holds every earlier one; labellers write different files, so many at once lose nothing. A restarted
server reads the files back and every labeller goes on where they left off.

Assignment: a labeller gets a pair nobody has judged yet, except that with probability `overlap` (drawn per labeller
and judgement number) they get one exactly one other labeller has judged: those doubly judged pairs measure
agreement (Cohen's kappa). A pair handed out and not yet answered is held for its labeller for RESERVE_S.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from rlhf_dist.config import ConfigError
from rlhf_dist.data.labels import ABSTAINED_DIR, DECIDED, JUDGEMENT_SCHEMA, read_judgements
from rlhf_dist.label.agreement import summarize
from rlhf_dist.label.pairs import Pair, write_atomic

LABELLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHOICES = {"left", "right", "tie", "skip"}
RESERVE_S = 600.0  # a pair handed to a labeller who went away goes to the others after this long


class LabelError(Exception):
    """A request the store refuses: one line for the page, and the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def unit(*parts) -> float:
    """A number in [0, 1) that is a fixed function of `parts`: the same draw on every machine and after a restart."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class LabelStore:
    def __init__(
        self,
        folder: str | Path,
        pairs: list[Pair],
        *,
        overlap: float,
        seed: int,
        policy: str,
        synthetic: bool = False,
        sampler=None,
        low_water: int = 0,
        clock: Callable[[], float] | None = None,
    ):
        self.folder = Path(folder)
        (self.folder / ABSTAINED_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._claim()
        self.overlap, self.seed, self.policy, self.synthetic = overlap, seed, policy, synthetic
        self.sampler, self.low_water = sampler, low_water
        self.clock = clock or (lambda: datetime.now(timezone.utc).timestamp())
        self._lock = threading.Lock()
        self._labeller_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._sampling: threading.Thread | None = None
        self.sample_error: str | None = None
        self.pairs: dict[int, Pair] = {}
        self.order: list[int] = []
        self._add_pairs(pairs)
        self.rows: dict[str, list[dict]] = defaultdict(list)  # labeller -> judgements, by seq
        self.seen: dict[str, set[int]] = defaultdict(set)  # pairs a labeller has judged or skipped
        self.judged_by: dict[int, list[str]] = defaultdict(list)  # pair -> labellers who judged it (not skips)
        self.current: dict[str, tuple[int, float]] = {}  # labeller -> (pair handed out, when)
        for tmp in list(self.folder.glob(".*.tmp")) + list((self.folder / ABSTAINED_DIR).glob(".*.tmp")):
            tmp.unlink()  # a write that died before its rename; the file it was replacing is intact
        for row in read_judgements(self.folder).to_pylist():
            self._index(row)

    # -- the lock on the folder: one server writes a label folder ------------------------------------------------

    def _claim(self) -> int:
        fd = os.open(self.folder / ".server.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                "label.output", f"{str(self.folder)!r} is being served by {holder}; stop that server or choose another"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        return fd

    def close(self) -> None:
        if self._sampling is not None:
            self._sampling.join()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- indices -------------------------------------------------------------------------------------------------

    def _add_pairs(self, pairs: list[Pair]) -> None:
        for p in pairs:
            if p.pair_id not in self.pairs:
                self.pairs[p.pair_id] = p
                self.order.append(p.pair_id)

    def _index(self, row: dict) -> None:
        who, pid = row["labeller_id"], row["pair_id"]
        self.rows[who].append(row)
        self.seen[who].add(pid)
        if row["verdict"] != "skip":
            self.judged_by[pid].append(who)

    def _unindex_last(self, who: str) -> dict:
        row = self.rows[who].pop()
        self.seen[who].discard(row["pair_id"])
        if row["verdict"] != "skip":
            self.judged_by[row["pair_id"]].remove(who)
        return row

    # -- what the page asks for ----------------------------------------------------------------------------------

    def a_on_left(self, who: str, pair_id: int) -> bool:
        """Which side response a is shown on: drawn per (labeller, pair), so position bias averages out."""
        return unit(self.seed, "side", who, pair_id) < 0.5

    def next_pair(self, who: str) -> dict:
        check_labeller(who)
        with self._lock:
            return self._view(who)

    def judge(self, who: str, pair_id: int, choice: str, note: str | None = None) -> dict:
        """Records `choice` (left / right / tie / skip, as the labeller saw the pair) and returns the next pair."""
        check_labeller(who)
        if choice not in CHOICES:
            raise LabelError(f"choice {choice!r}: use one of left, right, tie, skip")
        with self._labeller_locks[who]:
            with self._lock:
                pair = self.pairs.get(pair_id)
                if pair is None:
                    raise LabelError(f"no pair {pair_id}; reload the page", 404)
                if pair_id in self.seen[who]:
                    raise LabelError(f"pair {pair_id} is already judged by {who}; reload the page", 409)
                row = self._row(who, pair, choice, note)
                self._index(row)
                self.current.pop(who, None)
            try:
                self._write(who, abstained=row["verdict"] not in DECIDED)
            except BaseException:
                with self._lock:
                    self._unindex_last(who)
                raise
            with self._lock:
                return self._view(who)

    def undo(self, who: str) -> dict:
        """Takes back the labeller's last judgement; that pair is theirs to judge again (its note comes back too)."""
        check_labeller(who)
        with self._labeller_locks[who]:
            with self._lock:
                if not self.rows[who]:
                    raise LabelError(f"{who} has no judgement to undo", 409)
                row = self._unindex_last(who)
                self.current[who] = (row["pair_id"], self.clock())
            try:
                self._write(who, abstained=row["verdict"] not in DECIDED)
            except BaseException:
                with self._lock:
                    self._index(row)
                raise
            with self._lock:
                return {**self._view(who), "undone": row["pair_id"], "note": row["note"] or ""}

    def table(self) -> pa.Table:
        """Every judgement in memory (what the files hold), JUDGEMENT_SCHEMA."""
        with self._lock:
            rows = [r for who in sorted(self.rows) for r in self.rows[who]]
        return pa.Table.from_pylist(rows, schema=JUDGEMENT_SCHEMA)

    def summary(self) -> dict:
        return summarize(self.table(), total_pairs=len(self.pairs), synthetic=self.synthetic)

    # -- inside the lock -----------------------------------------------------------------------------------------

    def _row(self, who: str, pair: Pair, choice: str, note: str | None) -> dict:
        verdict = (
            choice
            if choice in ("tie", "skip")
            else "a"
            if (choice == "left") == self.a_on_left(who, pair.pair_id)
            else "b"
        )
        a_wins = verdict != "b"
        seq = self.rows[who][-1]["seq"] + 1 if self.rows[who] else 0
        return {
            "prompt": pair.prompt,
            "chosen": pair.a if a_wins else pair.b,
            "rejected": pair.b if a_wins else pair.a,
            "judge": "human",
            "labeller_id": who,
            "pair_id": pair.pair_id,
            "verdict": verdict,
            "a_on_left": self.a_on_left(who, pair.pair_id),
            "policy_version_chosen": pair.version_a if a_wins else pair.version_b,
            "policy_version_rejected": pair.version_b if a_wins else pair.version_a,
            "policy": self.policy,
            "labelled_at": datetime.fromtimestamp(self.clock(), timezone.utc),
            "note": (note or "").strip() or None,
            "seq": seq,
        }

    def _write(self, who: str, abstained: bool) -> None:
        """Rewrites one of the labeller's two files from memory (the caller holds the labeller's lock)."""
        with self._lock:
            rows = [r for r in self.rows[who] if (r["verdict"] not in DECIDED) == abstained]
        path = self.folder / (ABSTAINED_DIR if abstained else "") / f"{who}.parquet"
        if rows:
            write_atomic(pa.Table.from_pylist(rows, schema=JUDGEMENT_SCHEMA), path)
        else:
            path.unlink(missing_ok=True)

    def _assign(self, who: str) -> int | None:
        now = self.clock()
        held = self.current.get(who)
        if held is not None and held[0] not in self.seen[who]:
            return held[0]
        reserved = {pid for other, (pid, t) in self.current.items() if other != who and now - t < RESERVE_S}
        seen = self.seen[who]
        pick = None
        if self.overlap > 0 and unit(self.seed, "overlap", who, len(seen)) < self.overlap:
            pick = next(
                (p for p in self.order if len(self.judged_by[p]) == 1 and p not in seen and p not in reserved), None
            )
        if pick is None:
            pick = next((p for p in self.order if not self.judged_by[p] and p not in seen and p not in reserved), None)
        if pick is not None:
            self.current[who] = (pick, now)
        return pick

    def _fresh(self) -> int:
        return sum(1 for p in self.order if not self.judged_by[p])

    def _view(self, who: str) -> dict:
        pid = self._assign(who)
        self._maybe_sample()
        mine = [r for r in self.rows[who] if r["verdict"] != "skip"]
        view = {
            "labeller": who,
            "progress": {
                "mine": len(mine),
                "skipped": len(self.rows[who]) - len(mine),
                "labelled": sum(1 for p in self.order if self.judged_by[p]),
                "total": len(self.pairs),
                "more_coming": self._sampling is not None,
            },
            "can_undo": bool(self.rows[who]),
            "pair": None,
            "waiting": pid is None and self._sampling is not None,
            "error": self.sample_error,
        }
        if pid is not None:
            pair, left = self.pairs[pid], self.a_on_left(who, pid)
            view["pair"] = {
                "pair_id": pid,
                "prompt": pair.prompt,
                "left": pair.a if left else pair.b,
                "right": pair.b if left else pair.a,
            }
        return view

    def _maybe_sample(self) -> None:
        """Starts sampling the next chunk in the background when unlabelled pairs run low."""
        s = self.sampler
        if s is None or self._sampling is not None or self.sample_error or s.exhausted():
            return
        if self._fresh() >= self.low_water:
            return

        def work():
            try:
                pairs = s.sample_next()
                error = None
            except Exception as err:  # noqa: BLE001 - shown on the page and in the summary, the server goes on
                pairs, error = [], f"sampling pairs failed: {type(err).__name__}: {err}"
            with self._lock:
                self._add_pairs(pairs)
                self.sample_error = error
                self._sampling = None

        self._sampling = threading.Thread(target=work, name="label-sampler", daemon=True)
        self._sampling.start()


def check_labeller(who: str) -> None:
    if not isinstance(who, str) or not LABELLER_ID.fullmatch(who):
        raise LabelError(f"labeller {who!r}: use 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit")
