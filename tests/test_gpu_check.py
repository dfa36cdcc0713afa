"""benchmarks/gpu_check.py, the one command for the GPU device: its dry run (CPU, gloo, the tiny model) runs every
check's code here, so the script cannot rot between device runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = {"a_zero2", "a_zero3", "b_cuda_ipc", "c_nccl", "d_ppo"}


def run_script(tmp_path, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)  # the device tool's folder; a test must not copy results there
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_make(tmp_path, *args, timeout=600):
    """The way the device runs it: `make gpu-check ARGS=...` (here with .venv's python)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MAKEFLAGS")}
    make_args = " ".join(["--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), *args])
    return subprocess.run(
        ["make", "-s", "gpu-check", f"ARGS={make_args}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_every_check_passes_with_its_numbers(tmp_path):
    proc = run_make(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "results" / "gpu_check_dry_run.json").read_text())
    checks = result["checks"]
    assert set(checks) == CHECKS
    assert {c["status"] for c in checks.values()} == {"ok"}, {k: c.get("error") for k, c in checks.items()}
    assert result["dry_run"] is True and result["ok"] is True

    for cid, stage in (("a_zero2", 2), ("a_zero3", 3)):
        n = checks[cid]["numbers"]
        assert n["zero_stage"] == stage and len(n["losses"]) == 2
        assert all(math.isfinite(x) and x > 0 for x in n["losses"])
        assert 0 < n["changed_frac"] <= 1
        assert min(n["init_s"], n["first_step_s"], n["step_s"], n["tokens_per_s"], n["peak_mb"], n["params"]) > 0

    b = checks["b_cuda_ipc"]["numbers"]
    assert b["equal"] and b["buckets"] > 1 and len(b["rounds"]) == 2
    assert min(b["bytes"], b["copy_s"], b["handover_s"], b["receive_gb_s"], b["end_to_end_gb_s"]) > 0

    c = checks["c_nccl"]["numbers"]
    assert c["backend"] == "gloo" and c["equal"] and c["buckets"] > 1
    assert min(c["bytes"], c["seconds"], c["gb_s"]) > 0

    d = checks["d_ppo"]["numbers"]
    assert d["iterations"] == 2 and d["memory_kind"] == "rss_peak"
    assert set(d["memory_mb"]) == {"rollout", "reward", "reference", "policy", "critic"}
    assert min(d["memory_mb"].values()) > 0
    for phase in ("time/generate", "time/score", "time/train"):
        assert d["phase_s"][phase] > 0
    assert len(d["logprob_mismatch"]) == 2 and all(0 <= x < 0.1 for x in d["logprob_mismatch"])
    assert d["seconds_per_iteration"] > 0 and d["startup_s"] > 0 and d["response_len"] > 0

    table = (tmp_path / "results" / "gpu_check_dry_run.md").read_text()
    for cid in CHECKS:
        assert f"| {cid} | ok |" in table
        assert (tmp_path / "results" / "gpu_check_dry_run_logs" / f"{cid}.log").is_file()


def test_a_failing_check_is_one_line_and_a_nonzero_exit(tmp_path):
    """Without --dry-run on a machine without CUDA, the selected check fails on its own, the rest are skipped."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    proc = run_script(tmp_path, "--only", "b", timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = json.loads((tmp_path / "results" / "gpu_check.json").read_text())["checks"]
    assert checks["b_cuda_ipc"]["status"] == "FAIL"
    assert checks["b_cuda_ipc"]["error"].startswith("RuntimeError: no CUDA device is visible")
    assert {checks[c]["status"] for c in CHECKS - {"b_cuda_ipc"}} == {"skipped"}
    log = (tmp_path / "results" / "gpu_check_logs" / "b_cuda_ipc.log").read_text()
    assert "Traceback" in log


def test_unknown_check_letter_is_refused(tmp_path):
    proc = run_script(tmp_path, "--only", "a,x", timeout=60)
    assert proc.returncode == 2 and "unknown check(s) ['x']" in proc.stderr
