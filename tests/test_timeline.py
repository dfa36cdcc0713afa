"""benchmarks/timeline.py: actors' spans become the bars of a Gantt chart (hand-worked numbers), the chart is a PNG
of the size the layout says, and (slow) a real run yields a timeline in which every actor worked."""

import importlib
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
timeline = importlib.import_module("timeline")

T0 = 100.0
DRIVER = [("generate", 100.0, 100.05), ("score", 100.06, 100.09)]
STATS = {
    "rollout": [{"spans": [("__init__", 90.0, 95.0), ("generate", 100.002, 100.048)]}],
    "policy": [
        {"spans": [("train", 100.1, 100.3), ("logprobs", 100.061, 100.08)]},  # recorded in the order they ended
        {"spans": []},
    ],
}


def approx_rows(rows):
    return [(label, [(n, pytest.approx(a), pytest.approx(b)) for n, a, b in spans]) for label, spans in rows]


def test_spans_become_ms_from_the_iterations_start_one_row_per_actor():
    rows = timeline.timeline_rows(STATS, DRIVER, T0)
    assert rows == approx_rows(
        [
            ("driver", [("generate", 0.0, 50.0), ("score", 60.0, 90.0)]),
            ("rollout 0", [("generate", 2.0, 48.0)]),  # the constructor is start-up, not the iteration
            ("policy 0", [("logprobs", 61.0, 80.0), ("train", 100.0, 300.0)]),  # sorted by start
            ("policy 1", []),
        ]
    )


def test_bars_group_a_rows_spans_by_name_as_start_and_width():
    spans = [("train", 0.0, 10.0), ("push_weights", 10.0, 12.5), ("train", 20.0, 25.0)]
    assert timeline.bars(spans) == {"train": [(0.0, 10.0), (20.0, 5.0)], "push_weights": [(10.0, 2.5)]}
    # 0..15 (two overlapping calls counted once) + 20..30
    assert timeline.busy_ms([("a", 0.0, 10.0), ("b", 5.0, 15.0), ("c", 20.0, 30.0)]) == 25.0


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("n_actors", [1, 4])
def test_draw_gantt_writes_a_png_of_the_layouts_size(tmp_path, n_actors):
    stats = {"rollout": [{"spans": [("generate", 100.0, 100.04 + 0.01 * r)]} for r in range(n_actors)]}
    rows = timeline.timeline_rows(stats, DRIVER, T0)
    path = timeline.draw_gantt(rows, tmp_path / "sub" / "t.png", title="synthetic")
    assert path.exists()
    # 1400 px wide; 140 px of axes and legend margins plus 40 px per row (driver + actors)
    assert png_size(path) == timeline.figure_px(1 + n_actors) == (1400, 140 + 40 * (1 + n_actors))
