"""`rlhf-dist submit`: run a config on a Ray cluster through Ray's Job Submission API, and follow, inspect or stop it.

    rlhf-dist submit configs/qwen0.5b_2x8_multinode.yaml train.iterations=10 --address http://HEAD:8265
    rlhf-dist submit --status raysubmit_abc   |   --logs raysubmit_abc   |   --stop raysubmit_abc

The job's entrypoint is `rlhf-dist train CONFIG OVERRIDES...`, run on the head node inside a copy of the working
directory, uploaded with the job: the project and its configs, without outputs (runs/, the config's output_dir,
checkpoints), logs, virtual environments, .git and caches (EXCLUDES; one line before the upload says what goes and
its size). The config is loaded and validated here first, so a bad config fails before anything reaches the cluster.

Address: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; it is the job server (the head's dashboard,
`http://HEAD:8265`), not the GCS port 6379. Auth: with token auth on (RAY_AUTH_MODE=token), Ray's SDK sends the
token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; tokens never go into the job's runtime_env.

Exit codes: 0 the job SUCCEEDED (or, without following, was submitted / is not failed); 1 it FAILED or was
STOPPED; 2 nothing was submitted or asked (bad config, no address, cluster unreachable, unknown job).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlhf_dist.config import ConfigError, load_config, read_yaml

PROG = "rlhf-dist submit"
OK, JOB_FAILED, ERROR = 0, 1, 2
# Left out of the uploaded working dir: outputs, logs, environments, caches. Ray's runtime_env "excludes" are
# gitignore-style patterns matched against each path relative to the working dir, the directories themselves given
# without a trailing slash: so "runs/" would drop what is inside runs but still hash the name "runs", and "/runs"
# drops the directory itself. Ray also honours .gitignore and .rayignore files there. `upload_excludes` adds the
# run's output_dir and every virtual environment it finds.
EXCLUDES = [
    ".git",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".venv*",
    "*.log",
    "logs",
    "checkpoints",
    ".device",
    "/runs",
    "/out",
    "/tiny_model",
    "/benchmarks/results",
]
# Passed from this shell to the job when set here. Never secrets: the runtime_env is shown in the dashboard.
PASSTHROUGH_ENV = ("RAY_AUTH_MODE",)
_quiet = logging.getLogger(__name__)  # Ray's packager logs every .gitignore it reads at INFO; not ours to repeat


class SubmitError(Exception):
    """A problem found before or while talking to the job server; the message says the fix."""


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; an http(s) URL of the job server."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD_IP:8265 or export "
            "RAY_ADDRESS=http://HEAD_IP:8265 (the head node's dashboard / job server)"
        )
    if address == "auto" or address.startswith("ray://"):
        raise SubmitError(
            f"address {address!r} is not a job server; use the head's dashboard, "
            f"http://HEAD_IP:8265 (on the head node itself: http://127.0.0.1:8265 or its node IP)"
        )
    return address if "://" in address else f"http://{address}"


def client(address: str | None):
    """A connected JobSubmissionClient; unreachable or unauthorised clusters become a SubmitError with the fix."""
    from ray.job_submission import JobSubmissionClient  # deferred: cli

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, auth RuntimeError, version mismatch...
        hint = (
            "; the job server is the head's dashboard (default port 8265), not the GCS port 6379"
            if url.rstrip("/").endswith(":6379")
            else ""
        )
        auth = (
            "; the cluster wants a token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
            if "uthenticat" in str(e)
            else ""
        )
        raise SubmitError(f"cannot reach the job server at {url}: {str(e).strip().splitlines()[0]}{hint}{auth}") from e


def _job_overrides(config_path: str, overrides: Sequence[str]) -> list[str]:
    """The overrides the job needs on top of the user's: a config without ray.address joins the cluster it runs on."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "ray.address" in keys or (read_yaml(config_path).get("ray") or {}).get("address") is not None:
        return []
    extra = ["ray.address=auto"]
    if "ray.num_cpus" not in keys:
        extra.append("ray.num_cpus=null")  # it sizes the embedded Ray only
    return extra


def _relative_to_working_dir(config_path: str, working_dir: str) -> str:
    cfg, wd = Path(config_path).resolve(), Path(working_dir).resolve()
    try:
        return cfg.relative_to(wd).as_posix()
    except ValueError:
        raise SubmitError(
            f"config {config_path} is outside the working dir {wd} that is uploaded with the job; "
            f"move it under {wd} or pass --working-dir to a directory that holds it"
        ) from None


def _anchored(path: str, working_dir: str) -> str | None:
    """`path` as a pattern anchored at the working dir ("/runs/exp1"), or None when it is not strictly inside it."""
    p, wd = Path(path).resolve(), Path(working_dir).resolve()
    if p == wd or not p.is_relative_to(wd):
        return None
    return "/" + p.relative_to(wd).as_posix()


def _is_environment(p: Path) -> bool:
    return p.is_dir() and ((p / "pyvenv.cfg").is_file() or (p / "conda-meta").is_dir())


def upload_excludes(working_dir: str, excludes: Sequence[str] = EXCLUDES) -> tuple[list[str], int, int]:
    """The `excludes` to send with `working_dir`, and what Ray will then upload: (excludes, files, bytes).

    Walks the directory with Ray's own packaging rules (these patterns, Ray's default excludes, .gitignore and
    .rayignore in each directory), adding every virtual environment it meets (a directory holding pyvenv.cfg or
    conda-meta/, whatever its name) as an anchored pattern.
    """
    from ray._private.ray_constants import get_runtime_env_default_excludes  # deferred: cli
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes  # deferred: cli

    root = Path(working_dir).resolve()
    found: list[str] = []
    files = size = 0

    def environment(p: Path) -> bool:
        if p != root and _is_environment(p):
            found.append("/" + p.relative_to(root).as_posix())
            return True
        return False

    def count(p: Path) -> None:
        nonlocal files, size
        if p.is_file():
            try:
                size += p.stat().st_size
                files += 1
            except OSError:  # gone since it was listed
                pass

    # as the job SDK decides (ray/dashboard/modules/dashboard_sdk.py)
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    patterns = get_runtime_env_default_excludes() + list(excludes)
    _dir_travel(
        root, [_get_excludes(root, patterns), environment], count, include_gitignore=include_gitignore, logger=_quiet
    )
    return list(excludes) + found, files, size


def submit(
    config_path: str,
    overrides: Sequence[str] = (),
    address: str | None = None,
    working_dir: str = ".",
    follow: bool = True,
    env_vars: dict[str, str] | None = None,
    job_id: str | None = None,
) -> int:
    """Validate the config here, then submit `rlhf-dist train CONFIG OVERRIDES...` and (by default) follow it."""
    overrides = list(overrides)
    try:
        rel = _relative_to_working_dir(config_path, working_dir)
        overrides += _job_overrides(config_path, overrides)
        cfg = load_config(config_path, overrides)  # raises ConfigError naming the key and the fix
    except (ConfigError, SubmitError) as e:
        _err(f"{e} (nothing was submitted)")
        return ERROR
    entrypoint = shlex.join(["rlhf-dist", "train", rel, *overrides])
    # a local run of this config may be writing there right now: a file that changes while Ray hashes and zips the
    # working dir makes the package differ from the hash it is uploaded under
    output = _anchored(cfg.output_dir, working_dir)
    excludes = EXCLUDES + ([output] if output else [])
    return submit_command(
        entrypoint,
        address,
        working_dir,
        follow,
        env_vars,
        job_id,
        metadata={"rlhf_dist_config": rel},
        excludes=excludes,
    )


def submit_command(
    entrypoint: str,
    address: str | None = None,
    working_dir: str = ".",
    follow: bool = True,
    env_vars: dict[str, str] | None = None,
    job_id: str | None = None,
    metadata: dict[str, str] | None = None,
    excludes: Sequence[str] = EXCLUDES,
) -> int:
    """Submit any shell `entrypoint` with `working_dir` uploaded; prints the job id; follows it if asked."""
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    # The driver's own ray.init(runtime_env=...) may set env vars too (rlhf_dist.orchestration.cluster.worker_env);
    # Ray refuses a job whose driver repeats a key of the job's runtime_env unless told to merge (driver wins).
    env.update({"PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"})
    env.update(env_vars or {})
    wd = Path(working_dir).resolve()
    try:
        c = client(address)
        if not wd.is_dir():
            raise SubmitError(f"the working dir {wd} is not a directory; pass --working-dir")
        try:
            excludes, files, size = upload_excludes(str(wd), excludes)
        except OSError as e:
            raise SubmitError(f"cannot read the working dir {wd}: {e}") from e
    except SubmitError as e:
        _err(f"{e} (nothing was submitted)")
        return ERROR
    print(
        f"{PROG}: uploading {wd} ({files} files, {size / 2**20:.1f} MiB), leaving out {' '.join(excludes)} "
        f"and what .gitignore/.rayignore name",
        flush=True,
    )
    runtime_env = {"working_dir": str(wd), "excludes": excludes, "env_vars": env}
    try:
        job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id, metadata=metadata)
    except Exception as e:  # the job server refused: duplicate id, working dir too large, bad runtime_env...
        _err(f"the job server refused the job: {str(e).strip()}")
        return ERROR
    print(f"{PROG}: submitted job {job_id} to {c.get_address()}: {entrypoint}", flush=True)
    if not follow:
        print(
            f"{PROG}: follow it with `rlhf-dist submit --logs {job_id}`, stop it with "
            f"`rlhf-dist submit --stop {job_id}`",
            flush=True,
        )
        return OK
    return _follow(c, job_id)


async def _tail(c, job_id: str) -> None:
    async for chunk in c.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _follow(c, job_id: str) -> int:
    """Stream the job's logs until it ends; the exit code says how it ended."""
    try:
        try:
            asyncio.run(_tail(c, job_id))
        except RuntimeError as e:  # the log stream closed early (e.g. job server restart): fall back to polling
            print(f"{PROG}: log stream ended ({e}); waiting for the job to finish", file=sys.stderr, flush=True)
        while not c.get_job_status(job_id).is_terminal():
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: stopped following; job {job_id} keeps running (`rlhf-dist submit --stop {job_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    return _report(c.get_job_info(job_id), job_id)


def _report(info, job_id: str) -> int:
    from ray.job_submission import JobStatus  # deferred: cli

    status = info.status
    line = f"{PROG}: job {job_id} {status.value}"
    if info.start_time and info.end_time:
        line += f" after {(info.end_time - info.start_time) / 1000:.1f} s"
    if getattr(info, "driver_exit_code", None) is not None:
        line += f" (exit code {info.driver_exit_code})"
    if info.message and status != JobStatus.SUCCEEDED:
        line += f": {info.message.strip()}"
    print(line, file=sys.stderr if status in (JobStatus.FAILED, JobStatus.STOPPED) else sys.stdout, flush=True)
    return JOB_FAILED if status in (JobStatus.FAILED, JobStatus.STOPPED) else OK


def _with_job(job_id: str, address: str | None, action) -> int:
    try:
        c = client(address)
        return action(c)
    except SubmitError as e:
        _err(str(e))
    except Exception as e:  # unknown job id (the SDK raises RuntimeError with the server's 404 text), ...
        _err(f"job {job_id}: {str(e).strip()}")
    return ERROR


def status(job_id: str, address: str | None = None) -> int:
    """Print the job's status (and message); 0 unless it FAILED or was STOPPED."""
    return _with_job(job_id, address, lambda c: _report(c.get_job_info(job_id), job_id))


def logs(job_id: str, address: str | None = None, follow: bool = False) -> int:
    """Print the job's logs so far (or follow them to the end: then the exit code is the job's, as for submit)."""

    def action(c):
        if follow:
            return _follow(c, job_id)
        sys.stdout.write(c.get_job_logs(job_id))
        sys.stdout.flush()
        return OK

    return _with_job(job_id, address, action)


def stop(job_id: str, address: str | None = None, wait_s: float = 60.0) -> int:
    """Ask the job to stop and wait (up to `wait_s`) until it has; 0 once it is over, stopped or not."""

    def action(c):
        if c.stop_job(job_id):
            print(f"{PROG}: stopping job {job_id}", flush=True)
        deadline = time.monotonic() + wait_s
        while not c.get_job_status(job_id).is_terminal():
            if time.monotonic() > deadline:
                _err(f"job {job_id} still {c.get_job_status(job_id).value} after {wait_s:.0f} s")
                return ERROR
            time.sleep(0.5)
        _report(c.get_job_info(job_id), job_id)
        return OK

    return _with_job(job_id, address, action)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def add_submit_args(p: argparse.ArgumentParser) -> None:
    """The arguments of `rlhf-dist submit` (for a parser made elsewhere)."""
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML file under the working dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.iterations=3")
    p.add_argument("--address", help="job server, e.g. http://HEAD_IP:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="directory uploaded with the job (default: .)")
    p.add_argument("--no-follow", dest="follow", action="store_false", help="print the job id and return")
    p.add_argument("--job-id", help="submission id to use (default: generated)")
    p.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable; not for secrets)",
    )
    act = p.add_mutually_exclusive_group()
    act.add_argument("--status", metavar="JOB", help="print a job's status")
    act.add_argument("--logs", metavar="JOB", help="print a job's logs (with --follow: until it ends)")
    act.add_argument("--stop", metavar="JOB", help="stop a job")
    p.add_argument("--follow", dest="follow_logs", action="store_true", help="with --logs: follow to the end")


def run_submit(args: argparse.Namespace) -> int:
    """The handler of `rlhf-dist submit`; returns the exit code."""
    job = args.status or args.logs or args.stop
    if job and args.config:
        _err("give either CONFIG (submit) or one of --status/--logs/--stop JOB, not both")
        return ERROR
    if args.status:
        return status(args.status, args.address)
    if args.logs:
        return logs(args.logs, args.address, follow=args.follow_logs)
    if args.stop:
        return stop(args.stop, args.address)
    if not args.config:
        _err("missing CONFIG (or --status/--logs/--stop JOB)")
        return ERROR
    return submit(args.config, args.overrides, args.address, args.working_dir, args.follow, dict(args.env), args.job_id)


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """Register `submit` on an argparse subparsers object; sets `func` (and `handler`) to `run_submit`."""
    p = subparsers.add_parser(
        "submit", help="run a config on a Ray cluster (Ray Jobs)", description=__doc__.split("\n\n")[0]
    )
    add_submit_args(p)
    p.set_defaults(func=run_submit, handler=run_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-dist")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
