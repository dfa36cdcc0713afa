"""Resumable runs: a checkpoint holds the learners' model/optimizer/scheduler states, the data position, the KL
controller and the RNG states; resuming gives the same next iteration as not stopping (OpenRLHF #928, veRL #7401).

Layout: ``<output_dir>/checkpoints/iter_<N>/{policy,critic}/`` (each learner engine's own format) and ``driver.json``,
written last, so a checkpoint without ``driver.json`` is incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

DRIVER_STATE = "driver.json"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_root(output_dir)
    done = [p for p in root.glob("iter_*") if (p / DRIVER_STATE).exists()] if root.exists() else []
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


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


def prune(output_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete the rest."""
    root = checkpoint_root(output_dir)
    done = sorted(
        (p for p in root.glob("iter_*") if (p / DRIVER_STATE).exists()), key=lambda p: int(p.name.split("_")[1])
    )
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
