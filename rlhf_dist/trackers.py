"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow (``logging.trackers``).

Each is written with its library's own writer: ``torch.utils.tensorboard.SummaryWriter`` (event files under
``<output_dir>/tensorboard/<command>``), ``wandb`` (offline by default: the run directory under
``<output_dir>/wandb`` holds its history; ``wandb sync`` uploads it), and ``mlflow``'s ``MlflowClient`` (a local file
store under ``<output_dir>/mlruns`` unless ``logging.mlflow_tracking_uri`` names another). Every tracker run gets the
config, the run manifest (``run.json``) and, at the end, the plot. A resumed run continues its tracker runs (the
wandb id and an mlflow tag carry the run id of ``run.json``).

The drivers keep logging through ``MetricsLog``; ``open_log`` hands them one whose rows also go to the trackers. The
trackers start and write on a thread of their own, at a lower CPU priority, so their imports (wandb's alone take
seconds) and writes use the CPU the actors leave idle instead of adding to the run; a tracker that fails stops the run
at its next row, naming the tracker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_dist import run_dir
from rlhf_dist.config import RunConfig, config_to_dict, dump_yaml
from rlhf_dist.config.validate import check_trackers
from rlhf_dist.metrics import MetricsLog

STEP_KEYS = ("iteration", "step")  # a row's x axis: PPO counts iterations, the offline stages optimizer steps
RUN_ID_TAG, COMMAND_TAG = "rlhf_dist.run_id", "rlhf_dist.command"


class TrackerError(RuntimeError):
    """A tracker failed while the run went on; the message names it (metrics.jsonl holds every row regardless)."""


def open_log(cfg: RunConfig, command: str, path: Path, resume: bool = False) -> MetricsLog:
    """The driver's MetricsLog for ``command``, writing to ``path`` and to ``logging.trackers``. Call it inside the
    run's claim of output_dir (``run_dir.claimed``) and before Ray starts: a tracker whose package is missing fails
    here, naming the extra to install."""
    check_trackers(cfg)
    names = [t for t in cfg.logging.trackers if t != "jsonl"]
    if not names:
        return MetricsLog(path, resume=resume)
    rd = run_dir.current(cfg.output_dir, command)
    info = RunInfo(
        out=Path(cfg.output_dir),
        command=command,
        name=f"{cfg.name}-{command}",
        run_id=rd.run_id,
        resume=resume,
        config=config_to_dict(cfg),
        config_yaml=dump_yaml(cfg),
        manifest=rd.manifest,
        project=cfg.logging.project,
        wandb_mode=cfg.logging.wandb_mode,
        mlflow_uri=cfg.logging.mlflow_tracking_uri,
    )
    return MetricsLog(path, resume=resume, trackers=Trackers({n: BACKENDS[n] for n in names}, info))


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What every tracker files a run under. run_id: run.json's (a resumed run keeps it); manifest: run.json."""

    out: Path
    command: str
    name: str
    run_id: str
    resume: bool
    config: dict
    config_yaml: str
    manifest: Path | None
    project: str = "rlhf_dist"
    wandb_mode: str = "offline"
    mlflow_uri: str | None = None


class Trackers:
    """Backends fed in order from one background thread: ``log``, ``artifact`` and ``close`` only queue work. The
    first failure is kept and raised on the caller's next call (a failed run's close reports it without raising)."""

    def __init__(self, backends: dict[str, Callable[[RunInfo], object]], info: RunInfo):
        self._queue: queue.Queue = queue.Queue()
        self._error: TrackerError | None = None
        self._told = False  # the error was raised to the caller already
        self._rows = 0
        self._thread = threading.Thread(target=self._work, args=(backends, info), name="trackers", daemon=True)
        self._thread.start()

    def log(self, row: dict) -> None:
        self._raise()
        step = next((int(row[k]) for k in STEP_KEYS if isinstance(row.get(k), (int, float))), self._rows)
        self._rows += 1
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._queue.put(("log", scalars, step))

    def artifact(self, path: Path) -> None:
        self._raise()
        self._queue.put(("artifact", Path(path)))

    def close(self, failed: bool = False) -> None:
        self._queue.put(("close", failed))
        self._thread.join()
        if self._error is not None and not self._told:
            if not failed:
                self._raise()
            print(f"rlhf_dist: {self._error}", flush=True)  # the run's own error is the one raised

    def _raise(self) -> None:
        if self._error is not None:
            self._told = True
            raise self._error

    def _work(self, backends: dict[str, Callable], info: RunInfo) -> None:
        _yield_cpu()
        started: dict[str, object] = {}
        failed = True
        try:
            for name, start in backends.items():  # here, not in the caller's thread: the imports take seconds
                started[name] = _named(name, "start", start, info)
            while (item := self._queue.get())[0] != "close":
                for name, backend in started.items():
                    _named(name, item[0], getattr(backend, item[0]), *item[1:])
            failed = item[1]
        except TrackerError as err:
            self._error = err
        for name, backend in started.items():
            try:
                _named(name, "close", backend.close, failed)
            except TrackerError as err:
                self._error = self._error or err


def _yield_cpu() -> None:
    """Run this thread, and the processes it starts (wandb's service), at the lowest CPU priority (nice 19): below
    the driver and below Ray's workers (nice 15), so a tracker's imports and writes take the CPU the actors leave
    idle. Linux keeps a nice value per thread (setpriority on a thread id); elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # no per-thread priority here, or not allowed: run as is
        pass


def _named(name: str, what: str, fn: Callable, *args):
    """fn(*args); any error of the tracker's library becomes one TrackerError line naming the tracker."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - libraries raise anything; the driver gets one line
        message = " ".join(str(err).split())[:300]
        raise TrackerError(f"logging.trackers: {name} failed in {what} ({type(err).__name__}: {message})") from err


# ---- the backends: Backend(info), then log(scalars, step), artifact(path), close(failed); all on the thread -------
class TensorBoard:
    """Scalars per step, the config and the manifest as text, the plot as an image."""

    def __init__(self, info: RunInfo):
        from tensorboard.compat.proto.summary_pb2 import Summary  # deferred: trackers
        from torch.utils.tensorboard import SummaryWriter  # deferred: trackers

        logdir = info.out / "tensorboard" / info.command
        if not info.resume:  # a fresh run's curves start clean; a resumed one appends (TensorBoard drops the
            shutil.rmtree(logdir, ignore_errors=True)  # steps it redoes, as after any restart)
        self.Summary, self.writer = Summary, SummaryWriter(log_dir=str(logdir))
        self.writer.add_text("config", _markdown(info.config_yaml, "yaml"), 0)
        if info.manifest is not None and info.manifest.exists():
            self.writer.add_text("run.json", _markdown(info.manifest.read_text(), "json"), 0)
        self.step = 0

    def log(self, scalars: dict[str, float], step: int) -> None:
        # one event holding every scalar of the row (add_scalar writes one event per value: ~9 ms a row, not ~1)
        self.step = step
        values = [self.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self.writer.file_writer.add_summary(self.Summary(value=values), step)

    def artifact(self, path: Path) -> None:
        if path.suffix.lower() == ".png":
            import matplotlib.image  # deferred: matplotlib

            self.writer.add_image(path.stem, matplotlib.image.imread(str(path))[..., :3], self.step, dataformats="HWC")
        else:
            self.writer.add_text(path.name, _markdown(path.read_text(), ""), self.step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class Wandb:
    """A wandb run (offline by default) under output_dir: history per step, the config, files in the run dir."""

    def __init__(self, info: RunInfo):
        import wandb  # deferred: trackers

        self.run = wandb.init(
            dir=str(info.out),
            project=info.project,
            name=info.name,
            id=f"{info.run_id}-{info.command}",
            resume="allow",
            mode=info.wandb_mode,
            config=info.config,
            settings=wandb.Settings(console="off", silent=True, disable_git=True, x_disable_stats=True),
        )
        self.files = Path(self.run.dir)
        (self.files / "config.yaml").write_text(info.config_yaml)
        if info.manifest is not None and info.manifest.exists():
            shutil.copy(info.manifest, self.files / info.manifest.name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def artifact(self, path: Path) -> None:
        shutil.copy(path, self.files / path.name)  # files in the run dir are kept (and uploaded by `wandb sync`)
        self.run.save(str(self.files / path.name), base_path=str(self.files), policy="now")

    def close(self, failed: bool) -> None:
        import wandb  # deferred: trackers

        self.run.finish(exit_code=1 if failed else 0)
        wandb.teardown()  # finish() returns before wandb's service has written the run file; this waits for it


class MLflow:
    """An MLflow run: metrics per step (``/`` in a key written as ``.``), the config as params and config.yaml,
    run.json and the plot as artifacts."""

    def __init__(self, info: RunInfo):
        uri = info.mlflow_uri
        if uri is None:
            # MLflow 3 keeps the file store (no database, no server) in maintenance mode behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (info.out / "mlruns").resolve().as_uri()
        from mlflow.entities import Metric, Param  # deferred: trackers
        from mlflow.tracking import MlflowClient  # deferred: trackers

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(info.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(info.project)
        tags = {RUN_ID_TAG: info.run_id, COMMAND_TAG: info.command}
        found = self.client.search_runs(
            [exp_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()), max_results=1
        )
        if found:  # a resumed run: same mlflow run, params as logged the first time (mlflow refuses changes)
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, tags=tags, run_name=info.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flat(info.config).items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, info.config_yaml, "config.yaml")
        if info.manifest is not None and info.manifest.exists():
            self.client.log_artifact(self.run_id, str(info.manifest))

    def log(self, scalars: dict[str, float], step: int) -> None:
        ms = int(1000 * time.time())
        metrics = [self.Metric(_mlflow_key(k), v, ms, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # mlflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


BACKENDS: dict[str, Callable[[RunInfo], object]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _mlflow_key(key: str) -> str:
    """``compute/rollout`` -> ``compute.rollout``: MLflow's file store keeps a metric as a file at its key's path, so
    ``compute/rollout`` and ``compute/rollout/generate`` could not both exist; other characters it refuses -> _."""
    return "".join(c if c.isalnum() or c in "_-. " else "." if c == "/" else "_" for c in key)


def _markdown(text: str, lang: str) -> str:
    return f"```{lang}\n{text}\n```"
