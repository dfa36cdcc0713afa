"""What the benchmark scripts share: the machine's description, plain-text tables, and the JSON they write."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model and count, memory, load (the CPU may be shared: numbers taken under load are noisy), GPUs."""
    info = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpus": [],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_line(info: dict) -> str:
    la = info["load_avg_1_5_15"]
    return f"load average {la[0]} / {la[1]} / {la[2]} on {info['cpu_count']} CPUs ({info['cpu_model']})"


def table(headers: list[str], rows: list[list], floatfmt: str = ".3g") -> str:
    """A Markdown table (readable as plain text too)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    path = Path(out_dir or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return path


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def overhead_share(frac: float) -> str:
    """``overhead_frac`` as a percentage; in a pipelined train.mode the generation's compute overlaps the other
    phases, their critical paths add up to more than the wall time, and the share is not defined."""
    if frac < 0:
        return "not defined: generation overlaps training (a pipelined train.mode)"
    return f"{100 * frac:.1f} %"


def config_path(config: str) -> str:
    """A config path as given, or relative to the repository root when it is not found from here."""
    if not Path(config).exists() and (ROOT / config).exists():
        return str(ROOT / config)
    return config
