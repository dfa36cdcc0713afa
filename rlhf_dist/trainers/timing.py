"""Where an iteration's time goes: model compute on the actors, and the rest (orchestration overhead).

Every actor reports the seconds it spent inside each role method (``RoleGroup.compute_stats``). Here those numbers
become one metrics row:
- ``compute/<role>``: the role's compute time, max over its actors within each phase, summed over phases (and
  ``compute/<role>/<method>`` for each method);
- ``critical/<phase>``: the compute on the phase's critical path: its longest chain of calls (``chains``, as the
  driver recorded them: within a phase the roles run side by side, the calls of one chain one after the other, such
  as the policy's training and then its weight push when the push is queued behind it);
- ``compute/critical_path``: the sum over phases, plus the driver's own math (advantages);
- ``overhead_frac = 1 - compute/critical_path / time/wall``: the share of the iteration spent outside model compute
  (scheduling, serialisation, object transfer, waiting on a busy CPU, the driver's bookkeeping);
- ``memory/<role>_peak_mb`` (and ``memory/<role>_gpu_peak_mb``): peak memory, max over the role's actors;
- ``cpu/...``: the same iteration in CPU time rather than wall time (``cpu_metrics``). Where cores are fewer than
  busy processes, a method's wall time includes waiting for a core, and time the overhead share loses can reappear
  as slower compute; the CPU the orchestration burns (the driver, Ray's work in the actors) is what it takes from
  the compute, whatever the latencies;
- ``throughput/tokens_per_s_per_gpu`` (or ``_per_cpu``): NeMo-RL's end-to-end tokens/s/GPU (``throughput``).
Pure functions on plain dicts (and one on an Arrow batch): no Ray here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from rlhf_dist.data import schema as S

if TYPE_CHECKING:
    from rlhf_dist.config.schema import RolesConfig

# Per phase, chains of "role.method" calls that run side by side; the calls within a chain run one after the other.
# A phase's critical path is its longest chain. The driver records them as it runs (orchestration/phases.py).
Chains = dict[str, tuple[tuple[str, ...], ...]]
NOT_PHASES = ("time/iteration", "time/wall")  # time/ columns that are sums, not phases
# the prefixes of every column written here: they measure how long and how much, so they differ between two runs of
# the same seed, where every other column is equal
TIMING_PREFIXES = ("time/", "compute/", "cpu/", "critical/", "overhead", "memory/", "overlapped/", "throughput/")


def phase_of(role: str, method: str, chains: Chains) -> str:
    """A method the driver does not know about (an evaluation pass, say) is a phase of its own."""
    name = f"{role}.{method}"
    for phase, phase_chains in chains.items():
        if any(name in chain for chain in phase_chains):
            return phase
    return name


def method_seconds(stats_by_role: dict[str, list[dict]]) -> dict[str, float]:
    """``{"role.method": seconds}``, the max over the role's actors."""
    out: dict[str, float] = {}
    for role, actors in stats_by_role.items():
        for stats in actors:
            for method, seconds in stats.get("seconds", {}).items():
                key = f"{role}.{method}"
                out[key] = max(out.get(key, 0.0), seconds)
    return out


def role_phase_seconds(stats_by_role: dict[str, list[dict]], chains: Chains) -> dict[str, dict[str, float]]:
    """``{role: {phase: seconds}}``: each actor's method seconds summed per phase, then the max over the actors."""
    out: dict[str, dict[str, float]] = {}
    for role, actors in stats_by_role.items():
        per_phase: dict[str, float] = {}
        for stats in actors:
            mine: dict[str, float] = {}
            for method, seconds in stats.get("seconds", {}).items():
                phase = phase_of(role, method, chains)
                mine[phase] = mine.get(phase, 0.0) + seconds
            for phase, seconds in mine.items():
                per_phase[phase] = max(per_phase.get(phase, 0.0), seconds)
        out[role] = per_phase
    return out


def critical_seconds(
    stats_by_role: dict[str, list[dict]], chains: Chains, driver: dict[str, float] | None = None
) -> dict[str, float]:
    """``{phase: compute seconds on its critical path}``: the longest chain (each call the max over the role's
    actors), for every phase with a call this iteration; ``driver`` adds the driver's own phases as they are."""
    seconds = method_seconds(stats_by_role)
    out: dict[str, float] = {}
    for phase, phase_chains in chains.items():
        if any(name in seconds for chain in phase_chains for name in chain):
            out[phase] = max(sum(seconds.get(name, 0.0) for name in chain) for chain in phase_chains)
    for name, s in seconds.items():
        role, method = name.split(".", 1)
        if phase_of(role, method, chains) == name:  # unknown to the driver: a phase of its own
            out[name] = s
    for phase, s in (driver or {}).items():
        out[phase] = out.get(phase, 0.0) + s
    return out


def overhead_fraction(critical_path_s: float, wall_s: float) -> float:
    return 1.0 - critical_path_s / wall_s if wall_s > 0 else float("nan")


def iteration_metrics(
    stats_by_role: dict[str, list[dict]], wall_s: float, chains: Chains, driver: dict[str, float] | None = None
) -> dict[str, float]:
    """The metrics row's timing and memory columns for one iteration (see the module docstring)."""
    row: dict[str, float] = {}
    for name, s in sorted(method_seconds(stats_by_role).items()):
        row["compute/" + name.replace(".", "/", 1)] = s
    role_phase = role_phase_seconds(stats_by_role, chains)
    row.update({f"compute/{role}": sum(phases.values()) for role, phases in role_phase.items()})
    critical = critical_seconds(stats_by_role, chains, driver)
    row.update({f"critical/{phase}": s for phase, s in critical.items()})
    row["compute/critical_path"] = sum(critical.values())
    row["time/wall"] = wall_s
    row["overhead_frac"] = overhead_fraction(row["compute/critical_path"], wall_s)
    row.update(peak_memory(stats_by_role))
    return row


def cpu_metrics(
    stats_by_role: dict[str, list[dict]], driver_cpu_s: float, driver_math_cpu_s: float = 0.0
) -> dict[str, float]:
    """The iteration's CPU seconds, each summed over the role's actors (CPU adds up where wall time overlaps):
    ``cpu/<role>`` inside its methods, ``cpu/<role>_outside`` the rest of its processes (Ray receiving the calls,
    serialising arguments and results, its threads); ``cpu/driver`` the driver's process without its own math
    (``cpu/driver_math``: advantages); ``cpu/orchestration_frac``: the driver's and the actors' CPU outside model
    compute, as a share of all of it. Ray's own processes (raylet, GCS, agents) are not in it: a driver on a cluster
    does not see them (``benchmarks/throughput.py`` adds those of a local instance)."""
    row: dict[str, float] = {}
    for role, actors in stats_by_role.items():
        row[f"cpu/{role}"] = sum(sum(s.get("cpu_seconds", {}).values()) for s in actors)
        outside = [s["outside_cpu_s"] for s in actors if "outside_cpu_s" in s]
        if outside:
            row[f"cpu/{role}_outside"] = sum(outside)
    row["cpu/driver"] = driver_cpu_s - driver_math_cpu_s
    row["cpu/driver_math"] = driver_math_cpu_s
    row["cpu/orchestration_frac"] = orchestration_cpu_share({k.removeprefix("cpu/"): v for k, v in row.items()})
    return row


# CPU that is orchestration rather than model compute: besides every actor's CPU outside its methods (``_outside``)
ORCHESTRATION_CPU = ("driver", "ray_processes")


def orchestration_cpu_share(cpu_s: dict[str, float]) -> float:
    """Of CPU seconds by where they went (``cpu_metrics``' names without ``cpu/``; ``ray_processes`` where a local
    Ray's own processes were read), the share that is orchestration."""
    orchestration = sum(v for k, v in cpu_s.items() if k.endswith("_outside") or k in ORCHESTRATION_CPU)
    total = sum(cpu_s.values())
    return orchestration / total if total > 0 else float("nan")


def peak_memory(stats_by_role: dict[str, list[dict]]) -> dict[str, float]:
    """``memory/<role>_peak_mb`` (resident set) and, where actors hold GPU memory, ``memory/<role>_gpu_peak_mb``."""
    row: dict[str, float] = {}
    for role, actors in stats_by_role.items():
        rss = [s["peak_rss_mb"] for s in actors if "peak_rss_mb" in s]
        gpu = [s["peak_gpu_mb"] for s in actors if "peak_gpu_mb" in s]
        if rss:
            row[f"memory/{role}_peak_mb"] = max(rss)
        if gpu:
            row[f"memory/{role}_gpu_peak_mb"] = max(gpu)
    return row


def phase_overhead(row: dict[str, float]) -> dict[str, float]:
    """Seconds outside compute in each driver phase (its wall time minus its critical-path compute), and
    ``between`` for the driver's time outside every phase (batch statistics, and the bookkeeping after the iteration
    before: the actors' ledgers, the metrics line, a checkpoint). Sums to ``time/wall - compute/critical_path``."""
    phases = [k.removeprefix("time/") for k in row if k.startswith("time/") and k not in NOT_PHASES]
    out = {p: row[f"time/{p}"] - row.get(f"critical/{p}", 0.0) for p in phases}
    extra = [
        k.removeprefix("critical/")
        for k in row
        if k.startswith("critical/") and k.removeprefix("critical/") not in phases
    ]
    out["between"] = row["time/wall"] - sum(row[f"time/{p}"] for p in phases) - sum(row[f"critical/{p}"] for p in extra)
    return out


# -- throughput per device, as NeMo-RL defines it -------------------------------------------------------------------
# NeMo-RL (github.com/NVIDIA-NeMo/RL, docs/about/performance-summary.md; docs.nvidia.com/nemo/rl/latest/about/
# performance-summary.html): "Tokens/sec/GPU = Total Tokens Processed / (Time for Stage x Number of GPUs)". Its
# end-to-end figure, ``e2e_tokens_per_sec_per_gpu`` in nemo_rl/algorithms/utils.py::print_performance_metrics, is
# ``metrics["total_num_tokens"] / timing["total_step_time"] / total_num_gpus``: total_num_tokens (grpo.py) sums the
# unpadded ``input_lengths`` of the flattened message logs, every sample's prompt plus its generated tokens;
# total_num_gpus is cluster.num_nodes x cluster.gpus_per_node, every GPU of the job, generation and training alike.


def batch_tokens(batch: pa.RecordBatch) -> int:
    """NeMo-RL's ``total_num_tokens`` of one iteration: every sample's prompt plus its response, unpadded (the
    list lengths of ``prompt_ids`` and ``response_ids``); a prompt answered n times counts n times."""
    return sum(int(pc.sum(pc.list_value_length(batch.column(c))).as_py() or 0) for c in (S.PROMPT_IDS, S.RESPONSE_IDS))


def run_devices(roles: RolesConfig) -> tuple[str, int]:
    """``("gpu", n)`` where any role has GPUs: the GPUs the roles reserve (a colocated role's are its anchor's,
    counted once; fractions rounded up, as a shared GPU is still one device); else ``("cpu", n)``: the logical CPUs
    Ray gives the actors (they may outnumber the cores: configs/tiny_cpu.yaml asks for 5 on a 2-core machine)."""
    gpus = roles.reserved("num_gpus")
    if gpus > 0:
        return "gpu", math.ceil(gpus - 1e-9)
    return "cpu", math.ceil(roles.reserved("num_cpus") - 1e-9)


def tokens_per_device_s(tokens: int, wall_s: float, kind: str, devices: int) -> dict[str, float]:
    """``throughput/tokens_per_s_per_<kind> = tokens / (wall_s x devices)`` and ``throughput/<kind>s = devices``."""
    if devices <= 0:
        raise ValueError(f"tokens per device-second needs at least one device, got {devices} {kind}(s)")
    rate = tokens / (wall_s * devices) if wall_s > 0 else float("nan")
    return {f"throughput/tokens_per_s_per_{kind}": rate, f"throughput/{kind}s": float(devices)}


def throughput(tokens: int, wall_s: float, roles: RolesConfig) -> dict[str, float]:
    """One iteration's tokens (``batch_tokens``) over its wall time (``time/wall``: NeMo-RL's total step time) and
    the run's devices (``run_devices``); the driver calls it once per iteration."""
    return tokens_per_device_s(tokens, wall_s, *run_devices(roles))
