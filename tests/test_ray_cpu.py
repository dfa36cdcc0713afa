"""benchmarks/ray_cpu.py: which processes are Ray's own, and the watcher that charges their CPU to iterations."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from ray_cpu import RayProcessCPU, is_ray_process, process_name  # noqa: E402

RAYLET = (
    "/x/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s/raylet "
    "--python_worker_command=/x/bin/python /x/site-packages/ray/_private/workers/setup_worker.py /x/default_worker.py"
)


@pytest.mark.parametrize(
    "title, ray_own, name",
    [
        (RAYLET, True, "raylet"),
        (
            "/x/bin/python -u /x/site-packages/ray/_private/log_monitor.py --session-dir=/tmp/ray",
            True,
            "log_monitor.py",
        ),
        ("ray::DashboardAgent", True, "ray::DashboardAgent"),
        ("ray::IDLE", True, "ray::IDLE"),
        ("ray::PolicyWorker.train", False, "ray::PolicyWorker.train"),
        ("ray::RolloutWorker", False, "ray::RolloutWorker"),
    ],
)
def test_ray_processes_are_told_from_role_actors_by_their_title(title, ray_own, name):
    assert is_ray_process(title) is ray_own
    assert process_name(title) == name


def test_the_watcher_charges_a_child_process_cpu_to_the_rows_written_meanwhile(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("{}\n" * 9)  # an older run's rows: not read until the file has started again
    spin = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    with RayProcessCPU(metrics, first_row=2, last_row=6, poll_s=0.01) as watch:
        time.sleep(0.1)
        metrics.write_text("")  # the run replaces the file
        time.sleep(0.1)
        metrics.write_text("{}\n{}\n")  # the last warm-up row: the first reading
        time.sleep(0.1)
        child = subprocess.Popen([sys.executable, "-c", spin])  # a process that starts after it counts in full
        try:
            time.sleep(2.0)
            with open(metrics, "a") as f:
                f.write("{}\n" * 3)  # three of four measured iterations: not read yet
            time.sleep(0.2)
            assert watch.last is None
            with open(metrics, "a") as f:
                f.write("{}\n")
            time.sleep(0.2)
        finally:
            child.kill()
            child.wait()
    got = watch.per_iteration()
    assert got["iterations_seen"] == 4
    assert 0.24 <= got["ray_processes_cpu_s"] <= 0.5  # ~1 s of CPU over 4 iterations
    assert got["machine_busy_cpu_s"] >= got["ray_processes_cpu_s"] * 0.9
    assert got["started_during"] == [Path(sys.executable).name]


def test_ray_call_cpu_measures_both_ends_of_real_calls():
    import ray
    from ray_call_cpu import measure

    res = measure(actors=1, seconds=0.5, payload_kb=4)
    assert not ray.is_initialized()  # it stops the Ray it started
    assert res["calls"] > 10 and res["calls_per_s"] > 20
    assert 0 < res["driver_cpu_ms_per_call"] < 50
    assert res["actor_cpu_ms_per_call"] > 0 and res["idle_actor_cpu_ms_per_s"] >= 0
