"""Resumable runs: a checkpoint holds the learners' model/optimizer/scheduler states, the data position, the KL
controller and the RNG states; resuming gives the same next iteration as not stopping (OpenRLHF #928, veRL #7401).

Layout: ``<output_dir>/checkpoints/iter_<N>/{policy,critic}/`` (each learner engine's own format) and ``driver.json``,
written last, so a checkpoint without ``driver.json`` is incomplete and never resumed from. driver.json names the run
that wrote it (``run_id``, ``defining``: see rlhf_dist/run_dir.py): resume and pruning take only the current run's.
A checkpoint without a run_id (written before run identity) is "unowned": resumed only when the caller accepts it,
never pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np

DRIVER_STATE = "driver.json"
_ITER = re.compile(r"iter_(\d+)")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def iteration_of(path: Path) -> int | None:
    m = _ITER.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoint_identity(path: Path) -> dict | None:
    """``{"run_id", "defining"}`` from a checkpoint's driver.json (None values when written before run identity);
    None when the checkpoint is incomplete."""
    try:
        state = json.loads((path / DRIVER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return {"run_id": state.get("run_id"), "defining": state.get("defining")}


def run_checkpoints(output_dir: str | os.PathLike, run_id: str, accept_unowned: bool = False) -> list[Path]:
    """The complete checkpoints of run `run_id` (and those without a run_id, if accepted), oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for p in root.glob("iter_*") if root.is_dir() else []:
        ident = checkpoint_identity(p) if iteration_of(p) is not None else None
        if ident is not None and (ident["run_id"] == run_id or (accept_unowned and ident["run_id"] is None)):
            found.append(p)
    return sorted(found, key=iteration_of)


def latest_checkpoint(output_dir: str | os.PathLike, *, run_id: str, accept_unowned: bool = False) -> Path | None:
    """The newest complete checkpoint of run `run_id`, or None."""
    done = run_checkpoints(output_dir, run_id, accept_unowned)
    return done[-1] if done else None


def begin_checkpoint(output_dir: str | os.PathLike, iteration: int, *, run_id: str) -> Path:
    """The empty dir a checkpoint of `iteration` is written into. What a crash left there (no driver.json) goes, and
    so does this run's own complete one; another run's complete checkpoint is never deleted."""
    path = checkpoint_root(output_dir) / f"iter_{iteration}"
    ident = checkpoint_identity(path)
    if ident is not None and ident["run_id"] != run_id:
        raise RuntimeError(
            f"{path} is a complete checkpoint of run {ident['run_id']}, not of this run ({run_id}); move it away"
        )
    if path.exists():
        remove_checkpoint(path)
    path.mkdir(parents=True)
    return path


def remove_checkpoint(path: Path, ignore_errors: bool = False) -> None:
    """driver.json first: a removal cut short leaves an incomplete checkpoint, never a complete-looking broken one."""
    (path / DRIVER_STATE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=ignore_errors)


def save_driver_state(path: Path, state: dict) -> None:
    state = dict(state, python_rng=_jsonable(random.getstate()), numpy_rng=_jsonable(np.random.get_state()))
    tmp = path / (DRIVER_STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path / DRIVER_STATE)


def load_driver_state(path: Path) -> dict:
    state = json.loads((path / DRIVER_STATE).read_text())
    random.setstate(_tuples(state.pop("python_rng")))
    kind, keys, pos, has_gauss, cached = state.pop("numpy_rng")
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def prune(output_dir: str | os.PathLike, keep: int, *, run_id: str) -> None:
    """Keep run `run_id`'s newest ``keep`` complete checkpoints; delete its older ones (never another run's)."""
    done = run_checkpoints(output_dir, run_id)
    for old in done[:-keep] if keep > 0 else []:
        remove_checkpoint(old, ignore_errors=True)  # a file left behind is no reason to stop training


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
