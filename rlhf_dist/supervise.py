"""A driver that dies (SIGKILL, the out-of-memory killer, a segfault) starts again and resumes from its run's last
complete checkpoint, at most ``checkpoint.max_auto_resume`` times, on a laptop and as a Ray job alike: `rlhf-dist
train` is then a small parent that imports neither Ray nor torch and runs the driver as its child.

Only a death by signal is resumed. An error the driver reports (bad data, NaN, stale weights) exits with a code and
would only happen again; SIGINT and SIGTERM are someone stopping the run. Inside the driver, a learner that dies is
resumed in-process (trainers/ppo.py::train_resuming) under the same bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

DRIVER_ENV = "RLHF_DIST_DRIVER"  # set in the child: it is the driver, not another supervisor
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_driver() -> bool:
    return os.environ.get(DRIVER_ENV) == "1"


def supervise(cli_args: list[str], max_resumes: int, prog: str = "rlhf-dist") -> int:
    """Runs ``python -m rlhf_dist.cli *cli_args`` as the driver; returns its exit code (128 + N for signal N)."""
    env = dict(os.environ, **{DRIVER_ENV: "1"})
    resumes, extra = 0, []
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None and signum != signal.SIGINT:  # a terminal's ^C reaches both
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOPPING}
    try:
        while True:
            child = subprocess.Popen([sys.executable, "-m", "rlhf_dist.cli", *cli_args, *extra], env=env)
            rc = child.wait()
            if rc >= 0:
                return rc
            name = signal.Signals(-rc).name
            if stopping or -rc in STOPPING:
                return 128 - rc
            if resumes >= max_resumes:
                print(
                    f"{prog}: error: the driver (pid {child.pid}) was killed by {name}; "
                    f"checkpoint.max_auto_resume={max_resumes} resumes spent",
                    file=sys.stderr,
                    flush=True,
                )
                return 128 - rc
            resumes += 1
            print(
                f"{prog}: the driver (pid {child.pid}) was killed by {name}; resuming from the last complete "
                f"checkpoint ({resumes}/{max_resumes})",
                file=sys.stderr,
                flush=True,
            )
            extra = ["checkpoint.resume=true"]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
