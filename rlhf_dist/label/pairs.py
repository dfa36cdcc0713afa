"""The answer pairs the labelling page shows: the `collect` stage's candidate pairs, or pairs sampled on demand.

`label.pairs=collect` reads `label.pairs_path` (default: collect.output), any Parquet with prompt, chosen and
rejected columns (pair_id and policy_version_chosen / _rejected when present); the simulated label in it is not
shown, and which answer goes left is drawn per labeller. `label.pairs=sample` loads collect.policy in this process
and samples two answers for the next `label.sample_prompts` prompts whenever the unlabelled pairs run low; each chunk
is written to `<label.output>/pairs/part-NNNNN.parquet`, so a restarted server shows the same pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_dist.config import ConfigError, RunConfig

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("response_a", pa.string()),
        pa.field("response_b", pa.string()),
        pa.field("policy_version_a", pa.int64()),
        pa.field("policy_version_b", pa.int64()),
    ]
)


@dataclass(frozen=True)
class Pair:
    pair_id: int
    prompt: str
    a: str
    b: str
    version_a: int = 0
    version_b: int = 0


def collected_path(cfg: RunConfig) -> Path:
    """label.pairs_path, else the file `rlhf-dist collect` writes (collect.output)."""
    return Path(cfg.label.pairs_path or cfg.collect.output or Path(cfg.output_dir) / "preferences.parquet")


def read_collected(path: Path) -> list[Pair]:
    """Candidate pairs from a preference Parquet; rows with an empty answer or two equal answers are left out."""
    key = "label.pairs_path"
    if not path.exists():
        raise ConfigError(key, f"{str(path)!r} does not exist; run `rlhf-dist collect` first or set label.pairs=sample")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ConfigError(key, f"{path}: not a readable Parquet file ({err}); point it at collect's output") from None
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise ConfigError(
            key,
            f"{path}: no column {', '.join(missing)} (it has {', '.join(table.column_names)}); give it a "
            "preference file with prompt, chosen and rejected",
        )
    col = lambda name, default: table.column(name).to_pylist() if name in table.column_names else default  # noqa
    n = table.num_rows
    ids = col("pair_id", list(range(n)))
    if len(set(ids)) != n:
        raise ConfigError(key, f"{path}: pair_id repeats; give every pair its own id or drop the column")
    va, vb = col("policy_version_chosen", [0] * n), col("policy_version_rejected", [0] * n)
    pairs = []
    for i, (p, a, b) in enumerate(zip(col("prompt", []), col("chosen", []), col("rejected", []))):
        if p and a and b and a.strip() and b.strip() and a.strip() != b.strip():
            pairs.append(Pair(int(ids[i]), p, a, b, int(va[i] or 0), int(vb[i] or 0)))
    return pairs


def pairs_of(table: pa.Table) -> list[Pair]:
    cols = [table.column(f.name).to_pylist() for f in CANDIDATE_SCHEMA]
    return [Pair(*row) for row in zip(*cols)]


def write_atomic(table: pa.Table, path: Path) -> None:
    """`path` holds the old file or the new one, never half of one: write a temp file beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
