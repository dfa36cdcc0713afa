"""Run identity: one run per output_dir at a time, a manifest saying which run the files belong to, and checks that
a new run neither clobbers another run's results nor resumes another run's checkpoints.

``with claim(cfg, "train") as rd:`` at the very start of a command, before Ray, in this order:
1. output_dir is created and written to (a probe file), and has room for what the run will write;
2. ``<output_dir>/.lock`` is taken with ``flock`` for the life of the run (the kernel drops it when the process dies,
   so a lock left by a dead process is simply taken) and names its holder, for the run that is refused;
3. the identity: a fresh run refuses a dir holding another run's results (unless ``checkpoint.overwrite`` deletes
   them; a run that left none is just replaced), a resumed run keeps the manifest's run_id and refuses a manifest
   whose defining keys disagree;
4. the manifest (``run.json``; ``<command>.run.json`` for the other commands, which may share a dir as the stage-by-
   stage workflow does) is written atomically, with one more attempt on every start.

Checkpoints carry the run_id and the defining keys (``rlhf_dist/checkpoint.py``); resume and pruning take only the
current run's. A checkpoint written before run identity existed (no run_id) is resumed only by a run that adopts a
dir without a manifest, i.e. a dir an older version wrote; it is never pruned.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import rlhf_dist
from rlhf_dist.config import ConfigError, RunConfig, config_to_dict, dump_yaml

LOCK = ".lock"
CHECKPOINTS = "checkpoints"  # rlhf_dist/checkpoint.py's checkpoint_root (a module of this layer: not imported)
MIN_FREE_BYTES = 100 * 2**20

# The keys that say which experiment a run is. A resume that changed one would continue another experiment from this
# one's weights and data position, so it is refused; every other key (iterations, learning rates, actor counts,
# logging, checkpointing) may change between attempts.
_COMMON = ("seed", "model.policy", "data.task", "data.prompts", "data.num_prompts")
DEFINING_KEYS = {
    "train": (*_COMMON, "model.reference", "model.critic", "model.reward", "reward.function", "algo.estimator"),
    "sft": (*_COMMON, "sft.data.path", "sft.demonstrations"),
    "collect": (*_COMMON, "collect.policy", "collect.num_prompts", "collect.judge"),
    "rm": (*_COMMON, "rm.init", "rm.data.path"),
    "dpo": (*_COMMON, "dpo.reference", "dpo.data.path", "dpo.loss_type"),
    "pipeline": (*_COMMON, "algo.estimator", "pipeline.ppo_reward"),
    "eval": (*_COMMON, "eval.prompts", "eval.samples"),  # each eval claims a new folder of its own
}


def results(cfg: RunConfig, command: str) -> list[Path]:
    """What a run of `command` leaves in output_dir (its driver in rlhf_dist/trainers/ writes them): a fresh run does
    not start over another run's, and checkpoint.overwrite deletes them. A stage's model (``<output_dir>/<stage>``)
    is not listed: the next run replaces it in place."""
    out = Path(cfg.output_dir)
    names = {
        "train": [CHECKPOINTS, cfg.logging.metrics_file, "policy"],
        "collect": [] if cfg.collect.output else ["preferences.parquet"],
        "pipeline": [cfg.pipeline.table_file],
        "eval": ["eval.json"],
    }.get(command, [f"{command}.metrics.jsonl"])
    return [out / n for n in names]


def manifest_path(output_dir: str | os.PathLike, command: str) -> Path:
    """``run.json`` for `train`; the other commands write beside it under their own name, like their metrics."""
    return Path(output_dir) / ("run.json" if command == "train" else f"{command}.run.json")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A claimed output_dir: who the run is. ``adopted_legacy``: the run took over a dir written before run identity
    existed, so checkpoints without a run_id are its own for resuming (never for pruning)."""

    output_dir: Path
    command: str
    run_id: str
    defining: dict
    manifest: Path
    attempt: int
    adopted_legacy: bool = False


# This process's claims: a pipeline claims its stages' dirs before Ray starts, and each stage's driver claims again.
# flock on a second descriptor of the same file conflicts even within one process, so a dir is locked once here.
_RUNS: dict[tuple[Path, str], RunDir] = {}
_LOCKS: dict[Path, list] = {}  # dir -> [fd, number of claims holding it]


def current(output_dir: str | os.PathLike, command: str) -> RunDir:
    """The run this process holds in output_dir for `command` (checkpoints are stamped with its id)."""
    rd = _RUNS.get((_key(output_dir), command))
    if rd is None:
        raise RuntimeError(f"{output_dir} is not claimed for {command!r} by this process; run inside run_dir.claim()")
    return rd


@contextmanager
def claim(cfg: RunConfig, command: str) -> Iterator[RunDir]:
    """Holds output_dir for this run (see the module's docstring); every failure is a ConfigError on one line."""
    if command not in DEFINING_KEYS:
        raise ValueError(f"unknown command {command!r}; one of {sorted(DEFINING_KEYS)}")
    out = _key(cfg.output_dir)
    if (out, command) in _RUNS:  # claimed already by this process: a pipeline stage
        yield _RUNS[(out, command)]
        return
    check_writable(out)
    check_free_space(out, need_bytes(cfg))
    with _locked(out, command):
        rd = _identify(cfg, command, out)
        _RUNS[(out, command)] = rd
        try:
            yield rd
        finally:
            del _RUNS[(out, command)]


def claimed(command: str) -> Callable:
    """Decorates a driver's ``run(cfg)``: the run happens inside ``claim(cfg, command)``."""

    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def claimed_run(cfg: RunConfig, *args, **kwargs):
            with claim(cfg, command):
                return run(cfg, *args, **kwargs)

        return claimed_run

    return wrap


# ---- before anything is written ----------------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            "output_dir", f"{str(out)!r} is not writable ({err.strerror}); choose another output_dir or fix it"
        ) from None


def need_bytes(cfg: RunConfig) -> int:
    """Room a run needs at the least: twice the policy on disk (a checkpoint and a saved policy), 100 MB or more."""
    return max(MIN_FREE_BYTES, 2 * dir_bytes(cfg.model.policy))


def dir_bytes(path: str | os.PathLike | None) -> int:
    """Bytes of the files under `path` (links followed: a Hugging Face cache links to its blobs); 0 if absent."""
    total = 0
    for root, _, files in os.walk(path or "", followlinks=False):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def check_free_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(
            "output_dir",
            f"{str(out)!r} has {free} bytes free ({free / 2**30:.2f} GiB), this run needs at least {need} "
            f"({need / 2**30:.2f} GiB: twice model.policy on disk, at least 100 MB); free space or choose another "
            f"output_dir",
        )


# ---- one run per output_dir ----------------------------------------------------------------------------------------
@contextmanager
def _locked(out: Path, command: str) -> Iterator[None]:
    held = _LOCKS.get(out)
    if held is not None:
        held[1] += 1
    else:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                "output_dir",
                f"{str(out)!r} is in use by another run ({holder}); wait for it to end or choose another output_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**_here(), "command": command}).encode(), 0)
        held = _LOCKS[out] = [fd, 1]
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _LOCKS[out]
            os.ftruncate(held[0], 0)  # the name of a holder that is gone would only mislead
            os.close(held[0])  # closing the last descriptor releases the lock


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{h['command']}, pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


# ---- which run the files belong to ---------------------------------------------------------------------------------
def defining_values(cfg: RunConfig, command: str) -> dict:
    d = config_to_dict(cfg)
    out = {}
    for key in DEFINING_KEYS[command]:
        v = d
        for part in key.split("."):
            v = v[part]
        out[key] = v
    return out


def check_defining(saved: dict, current: dict, what: str) -> None:
    """Refuses a resume whose config disagrees with the run's defining keys (those both sides know)."""
    diff = [k for k in current if k in saved and saved[k] != current[k]]
    if diff:
        was = ", ".join(f"{k}={saved[k]!r}" for k in diff)
        now = ", ".join(f"{k}={current[k]!r}" for k in diff)
        raise ConfigError(
            "checkpoint.resume",
            f"{what} was started with {was}, this config has {now}; resume with the run's values or start a new "
            f"output_dir",
        )


def _identify(cfg: RunConfig, command: str, out: Path) -> RunDir:
    path = manifest_path(out, command)
    old = _read_manifest(path)
    found = [p for p in results(cfg, command) if _exists(p)]
    defining = defining_values(cfg, command)
    adopted = False
    if cfg.checkpoint.resume and old is not None:
        check_defining(old.get("defining", {}), defining, f"run {old['run_id']} in {str(out)!r}")
        adopted = bool(old.get("adopted_legacy", False))
    elif cfg.checkpoint.resume:
        adopted = bool(found)  # results without a manifest: an older version wrote them
        if adopted:
            print(f"checkpoint.resume: {out} has no {path.name} (written before run identity); adopting it", flush=True)
    elif cfg.checkpoint.overwrite and (old is not None or found):  # a fresh run's: a resume continues, deletes nothing
        gone = [*found, path] if old is not None else found
        for p in gone:
            _remove(p)
        print(f"checkpoint.overwrite: deleted {', '.join(p.name for p in gone)} under {out}", flush=True)
        old = None
    elif found:
        owner = f"run {old['run_id']} ({_started(old)})" if old else "a run without a manifest (an older rlhf_dist)"
        raise ConfigError(
            "output_dir",
            f"{str(out)!r} holds {', '.join(p.name for p in found)} of {owner}; continue it with "
            f"checkpoint.resume=true, or start over with a new output_dir or checkpoint.overwrite=true (deletes them)",
        )
    elif old is not None:  # a run that left nothing behind (it failed while starting): nothing to protect
        print(f"{path}: run {old['run_id']} left no results; a new run takes its place", flush=True)
        old = None

    sha = hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()
    attempt = {**_here(), "config_sha256": sha, "code_version": code_version()}  # both may change on a resume
    if old is None:
        manifest = {
            "run_id": uuid.uuid4().hex,
            "command": command,
            **attempt,
            "seed": cfg.seed,
            "defining": defining,
            "adopted_legacy": adopted,
            "attempts": [attempt],
        }
    else:
        manifest = {**old, "attempts": [*old.get("attempts", []), attempt]}
    _write_json(path, manifest)
    return RunDir(out, command, manifest["run_id"], defining, path, len(manifest["attempts"]), adopted)


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["run_id"]
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "output_dir", f"{str(path)!r} is not a run manifest; move it away or choose another output_dir"
        ) from None


def code_version() -> dict:
    """The package version, and the git commit when running from a git checkout (None without git)."""
    src = Path(rlhf_dist.__file__).resolve().parents[1]
    commit = None
    if (src / ".git").exists():
        try:
            proc = subprocess.run(
                ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            if proc.returncode == 0 and proc.stdout.strip():
                commit = proc.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return {"package": rlhf_dist.__version__, "git_commit": commit}


def _here() -> dict:
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _started(m: dict) -> str:
    return f"{m.get('command')}, started {m.get('started')} by pid {m.get('pid')} on {m.get('host')}"


def _exists(p: Path) -> bool:
    if p.name == CHECKPOINTS:
        return p.is_dir() and any(p.glob("iter_*"))
    return p.exists()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _key(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir).resolve()
