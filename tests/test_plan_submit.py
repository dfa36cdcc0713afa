"""`rlhf-dist plan` joins a cluster only when told to; `rlhf-dist submit` uploads the project, never its outputs.

The submit tests build the package with Ray's own packaging helpers (the hash and the zip a job server would get),
so no cluster is needed; tests/test_cluster_submit.py submits to a real one.
"""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- plan ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_ray_init(monkeypatch):
    """Any ray.init in this process fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"plan called ray.init({args}, {kwargs})")

    monkeypatch.setattr(ray, "init", refuse)
    return ray


@pytest.mark.parametrize("overrides", [[], ["ray.address=auto", "ray.num_cpus=null"]])
def test_plan_without_address_describes_this_machine(no_ray_init, monkeypatch, capsys, overrides):
    from rlhf_dist.cli import main

    monkeypatch.chdir(REPO)
    # what a user exports for `submit`; before the fix plan's ray.init(address="auto") followed it
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert main(["plan", "configs/tiny_cpu.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "this machine" in out and "policy" in out
    assert ("not contacted" in out) == bool(overrides)  # the config's own address is named, not joined
    assert not no_ray_init.is_initialized()


@pytest.mark.parametrize(
    "address, says",
    [
        ("127.0.0.1:9", "nothing answers at"),  # port 9 on loopback: refused at once
        ("http://127.0.0.1:8265", "job server"),
        ("127.0.0.1", "HOST:PORT"),
    ],
)
def test_plan_bad_address_fails_in_one_line(no_ray_init, monkeypatch, capsys, address, says):
    from rlhf_dist.cli import main

    monkeypatch.chdir(REPO)
    t0 = time.monotonic()
    assert main(["plan", "configs/tiny_cpu.yaml", "--address", address]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-dist: error: ") and says in err[0], err


def test_plan_address_and_nodes_exclude_each_other(capsys):
    from rlhf_dist.cli import main

    assert main(["plan", "configs/tiny_cpu.yaml", "--nodes", "1", "--address", "auto"]) == 2
    assert "not allowed with" in capsys.readouterr().err


HEAD = """
import sys, ray
ray.init(num_cpus=6, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.shutdown()
"""


@pytest.mark.slow
def test_plan_with_address_joins_that_cluster(tmp_path):
    """A one-node Ray started by another process (6 logical CPUs): plan --address places on it, by its node IP."""
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        gcs = head.stdout.readline().strip()
        assert gcs, "the head process did not start Ray"
        proc = subprocess.run(
            [sys.executable, "-m", "rlhf_dist.cli", "plan", "configs/tiny_cpu.yaml", "--address", gcs],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"the cluster at {gcs} (1 node(s))" in proc.stdout
        assert gcs.rsplit(":", 1)[0] in proc.stdout  # actors are placed on the head's node
    finally:
        head.stdin.close()
        head.wait(timeout=60)


# --- submit: what is uploaded -----------------------------------------------------------------------------------------

PROJECT = ["rlhf_dist/__init__.py", "rlhf_dist/algo/gae.py", "configs/run.yaml", "benchmarks/throughput.py"]
LEFT_OUT = [
    "runs/x/metrics.jsonl",
    "exp/out1/metrics.jsonl",  # the config's output_dir
    "checkpoints/step1/model.pt",
    ".venv/pyvenv.cfg",
    ".venv/lib/site.py",
    ".venv-vllm/pyvenv.cfg",
    "myenv/pyvenv.cfg",  # a virtual environment by any name
    "myenv/bin/python",
    "submit.log",
    "logs/job.txt",
    ".git/HEAD",
    "rlhf_dist/__pycache__/gae.cpython-311.pyc",
    "rlhf_dist.egg-info/PKG-INFO",
    "benchmarks/results/r.json",
    ".device/out.txt",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    for name in PROJECT + LEFT_OUT:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(name)
    (wd / "configs/run.yaml").write_text((REPO / "configs/tiny_cpu.yaml").read_text())
    monkeypatch.chdir(wd)  # relative paths in the config are relative to where `submit` runs
    return wd


def submitted(wd: Path, monkeypatch, capsys) -> tuple[dict, list[str]]:
    """Run `submit` against a stand-in job server; returns the runtime_env it sent and the excludes Ray's job SDK
    then packages with (ours plus Ray's defaults)."""
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    from rlhf_dist import submit as S

    sent = {}

    class JobServer:
        def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
            sent.update(runtime_env)
            return "raysubmit_test"

        def get_address(self):
            return "http://stand-in:8265"

    monkeypatch.setattr(S, "client", lambda address: JobServer())
    assert S.submit("configs/run.yaml", ["output_dir=exp/out1"], "http://stand-in:8265", str(wd), follow=False) == 0
    used = {}
    upload_working_dir_if_needed(
        dict(sent),
        include_gitignore=True,
        upload_fn=lambda working_dir, excludes, is_file=False: used.update(x=excludes),
    )
    return sent, used["x"]


def test_submit_uploads_the_project_and_configs_only(workdir, tmp_path, monkeypatch, capsys):
    from ray._private.runtime_env.packaging import create_package

    runtime_env, excludes = submitted(workdir, monkeypatch, capsys)
    assert runtime_env["working_dir"] == str(workdir)
    pkg = tmp_path / "pkg.zip"
    create_package(str(workdir), pkg, include_gitignore=True, excludes=excludes)  # the zip the job server gets
    names = sorted(n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/"))
    assert names == sorted(PROJECT)
    line = next(x for x in capsys.readouterr().out.splitlines() if "uploading" in x)
    assert f"({len(PROJECT)} files," in line and "/exp/out1" in line and "/myenv" in line and "*.log" in line


def test_writing_outputs_while_hashing_keeps_the_package_hash(workdir, monkeypatch, capsys):
    import shutil

    from ray._private.runtime_env.packaging import get_uri_for_directory

    shutil.rmtree(workdir / "runs")  # a first run creates runs/ while the upload is under way
    _, excludes = submitted(workdir, monkeypatch, capsys)
    uri = get_uri_for_directory(str(workdir), include_gitignore=True, excludes=excludes)
    for name in ["runs/tiny/metrics.jsonl", "exp/out1/checkpoints/iter_2/x.pt", "logs/job.txt", ".venv-new/x.py"]:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text("written during the upload")
    with open(workdir / "submit.log", "a") as f:  # `rlhf-dist submit ... > submit.log`
        f.write("rlhf-dist submit: uploading ...\n")
    assert get_uri_for_directory(str(workdir), include_gitignore=True, excludes=excludes) == uri
    (workdir / "rlhf_dist/algo/gae.py").write_text("edited")  # the project itself is hashed
    assert get_uri_for_directory(str(workdir), include_gitignore=True, excludes=excludes) != uri
