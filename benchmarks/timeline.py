"""One iteration as a timeline: what each actor did when, beside the driver's phases, drawn as a Gantt chart.

    python benchmarks/timeline.py                                    # configs/tiny_cpu.yaml, after 3 warm-up iterations
    python benchmarks/timeline.py configs/grpo_tiny_cpu.yaml roles.rollout.num_actors=2 --warmup 5 --name grpo_r2

Runs the driver's own ``iteration()`` W times to warm up, then once more and draws that one: a row per actor (role
and rank) with a bar per role method call (the outermost calls each actor's ComputeLedger records, wall clock), a
row for the driver's phases, x in ms from the iteration's start. Gaps are orchestration: scheduling, transfers,
waiting. Writes benchmarks/results/timeline_<name>.png and timeline_<name>.json (the same spans in ms). Actors
on other nodes use their own clocks: there the bars are only as aligned as the nodes' clocks are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, ROOT, config_path, load_line, machine, table, write_json  # noqa: E402

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"
DEFAULT_WARMUP = 3
DRIVER = "driver"
# Figure geometry in pixels, so a test can know the PNG's size: a fixed width, a header and a band per row.
DPI, WIDTH_PX, HEADER_PX, ROW_PX = 100, 1400, 140, 40

Span = tuple[str, float, float]  # (method or phase, start, end)
Row = tuple[str, list[Span]]  # (row label, its spans in ms from the iteration's start)


# -- spans to bars: pure ---------------------------------------------------------------------------------------------
def spans_to_ms(spans: list[Span], t0: float) -> list[Span]:
    """Wall-clock seconds to ms from ``t0``, sorted by start."""
    return sorted(
        ((name, 1000.0 * (start - t0), 1000.0 * (end - t0)) for name, start, end in spans), key=lambda s: s[1]
    )


def timeline_rows(stats_by_role: dict[str, list[dict]], driver_spans: list[Span], t0: float) -> list[Row]:
    """The driver's phases first, then every actor (``collect_compute_stats`` order: role, then rank); an actor's
    constructor (``__init__``, start-up) is not part of an iteration."""
    rows: list[Row] = [(DRIVER, spans_to_ms(driver_spans, t0))]
    for role, actors in stats_by_role.items():
        for rank, stats in enumerate(actors):
            spans = [tuple(s) for s in stats.get("spans", []) if s[0] != "__init__"]
            rows.append((f"{role} {rank}", spans_to_ms(spans, t0)))
    return rows


def bars(spans: list[Span]) -> dict[str, list[tuple[float, float]]]:
    """``{name: [(start, width), ...]}``: one ``broken_barh`` per name, in order of first appearance."""
    out: dict[str, list[tuple[float, float]]] = {}
    for name, start, end in spans:
        out.setdefault(name, []).append((start, end - start))
    return out


def busy_ms(spans: list[Span]) -> float:
    """Time covered by at least one span (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for _, start, end in sorted(spans, key=lambda s: s[1]):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def figure_px(n_rows: int) -> tuple[int, int]:
    return WIDTH_PX, HEADER_PX + ROW_PX * n_rows


def draw_gantt(rows: list[Row], path: str | os.PathLike, title: str = "") -> Path:
    """One horizontal band per row (the first at the top), a bar per span coloured by its name (the same name has
    the same colour on every row: the driver's ``generate`` phase and the rollout's ``generate`` call), a legend.
    The PNG is ``figure_px(len(rows))`` pixels."""
    import matplotlib  # deferred: only the drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib

    names = list(dict.fromkeys(name for _, spans in rows for name, _, _ in spans))
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colour = {name: palette(i % palette.N) for i, name in enumerate(names)}
    width, height = figure_px(len(rows))
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.subplots_adjust(left=0.1, right=0.8, top=1 - 50 / height, bottom=70 / height)
    for y, (_, spans) in enumerate(rows):
        for name, segments in bars(spans).items():
            ax.broken_barh(segments, (y - 0.4, 0.8), facecolors=colour[name], edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row at the top
    ax.set_xlabel("ms from the iteration's start")
    ax.grid(axis="x", linewidth=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colour[n], edgecolor="black", linewidth=0.3) for n in names]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# -- the run ---------------------------------------------------------------------------------------------------------
def timed_phases():
    """The driver's ``Phases``, also keeping each phase's wall-clock start and end (the actors' clock)."""
    from rlhf_dist.orchestration.phases import Phases

    class TimedPhases(Phases):
        def __init__(self) -> None:
            super().__init__()
            self.spans: list[Span] = []

        @contextmanager
        def phase(self, name: str, on_driver: bool = False) -> Iterator[None]:
            start = time.time()
            try:
                with super().phase(name, on_driver):
                    yield
            finally:
                self.spans.append((name, start, time.time()))

    return TimedPhases()


def capture(cfg, warmup: int) -> dict:
    """W iterations, then one whose spans are kept: ``{"t0", "wall_s", "driver", "stats", "row"}``."""
    from rlhf_dist import run_dir
    from rlhf_dist.orchestration.cluster import ray_session
    from rlhf_dist.orchestration.launch import running_roles
    from rlhf_dist.orchestration.placement import plan, required_resources
    from rlhf_dist.orchestration.role_group import collect_compute_stats
    from rlhf_dist.trainers.ppo import PPORun, chain_scorers, close_iteration, iteration, prepare

    with run_dir.claim(cfg, "train"):
        sampler = prepare(cfg)
        with ray_session(cfg, min_cpus=required_resources(plan(cfg))["CPU"]), running_roles(cfg) as groups:
            run = PPORun.start(cfg, groups, sampler)
            collect_compute_stats(groups)  # empties the ledgers: start-up is not part of the first iteration
            for _ in range(warmup + 1):
                phases, t0 = timed_phases(), time.time()
                row = iteration(run, phases)
                ledgers = close_iteration(run)  # the next generation starts behind them, as in a run
                wall_s = time.time() - t0
                stats = collect_compute_stats(groups, ledgers)  # this iteration's spans, and empty for the next
                chain_scorers(run)  # as the run does after its bookkeeping
    return {"t0": t0, "wall_s": wall_s, "driver": phases.spans, "stats": stats, "row": row}


def timeline(
    config: str = DEFAULT_CONFIG,
    overrides: list[str] | tuple = (),
    warmup: int = DEFAULT_WARMUP,
    name: str | None = None,
    out: str | None = None,
    work: str | None = None,
) -> dict:
    """Run, capture iteration ``warmup`` (0-based), draw it, write the PNG and the JSON; returns the JSON's dict.
    ``work`` is the run's output_dir (default runs/bench/timeline_<name>)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_dist.config import load_config

    config = config_path(config)
    name = name or load_config(config, list(overrides)).name
    forced = [
        f"output_dir={work or ROOT / 'runs' / 'bench' / f'timeline_{name}'}",
        "logging.progress_bar=false",
        "checkpoint.resume=false",
        "checkpoint.overwrite=true",  # a rerun of the same name takes the dir again
    ]
    cfg = load_config(config, [*overrides, *forced])
    before = machine()
    got = capture(cfg, warmup)
    rows = timeline_rows(got["stats"], got["driver"], got["t0"])
    wall_ms = 1000.0 * got["wall_s"]
    title = f"{name}: iteration {warmup} (after {warmup} warm-up), {wall_ms:.0f} ms; {Path(config).name} " + " ".join(
        overrides
    )
    png = draw_gantt(rows, Path(out or RESULTS) / f"timeline_{name}.png", title)
    result = {
        "name": name,
        "config": config,
        "overrides": list(overrides),
        "iteration": warmup,
        "machine": before,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_ms": wall_ms,
        "png": str(png),
        "rows": [
            {"label": label, "busy_ms": busy_ms(spans), "spans": [list(s) for s in spans]} for label, spans in rows
        ],
    }
    result["json"] = str(write_json(f"timeline_{name}", result, out))
    return result


def render(res: dict) -> str:
    wall = res["wall_ms"]
    rows = [
        [
            r["label"],
            r["busy_ms"],
            f"{100 * r['busy_ms'] / wall:.1f}",
            " ".join(dict.fromkeys(s[0] for s in r["spans"])),
        ]
        for r in res["rows"]
    ]
    head = f"timeline_{res['name']}: iteration {res['iteration']}, {wall:.1f} ms\n{load_line(res['machine'])}"
    return head + "\n\n" + table(["row", "busy ms", "% of wall", "calls"], rows, floatfmt=".1f")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML (default {DEFAULT_CONFIG})")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. roles.rollout.num_actors=2"
    )
    p.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"iterations before the drawn one (default {DEFAULT_WARMUP})"
    )
    p.add_argument("--name", default=None, help="result name: timeline_<name>.png (default the config's name)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    res = timeline(a.config, a.overrides, a.warmup, a.name, a.out)
    print(render(res))
    print(f"\nchart: {res['png']}\nspans: {res['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
