"""Human judgements of answer pairs, as `rlhf-dist label` stores them and `rlhf-dist rm` / `dpo` read them.

A label folder holds one Parquet file per labeller, `<labeller>.parquet`: the pairs that labeller decided, in the
preference columns every stage reads (prompt, chosen, rejected), so the folder itself is a preference data set.
Ties and skips carry no preference; they sit in `abstained/<labeller>.parquet` with response a as `chosen` (the
readers of a folder take only its own files, never a subfolder's). Both have JUDGEMENT_SCHEMA.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlhf_dist.config import RunConfig

VERDICTS = ("a", "b", "tie", "skip")  # relative to the candidate pair's response_a / response_b
DECIDED = ("a", "b")
ABSTAINED_DIR = "abstained"

JUDGEMENT_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("judge", pa.string()),  # "human"
        pa.field("labeller_id", pa.string()),
        pa.field("pair_id", pa.int64()),
        pa.field("verdict", pa.string()),  # a | b | tie | skip
        pa.field("a_on_left", pa.bool_()),  # which side response a was shown on (position bias)
        pa.field("policy_version_chosen", pa.int64()),  # the policy version that sampled each answer
        pa.field("policy_version_rejected", pa.int64()),
        pa.field("policy", pa.string()),  # the model dir that sampled the pair
        pa.field("labelled_at", pa.timestamp("ms", tz="UTC")),
        pa.field("note", pa.string()),  # the labeller's free text; null when none
        pa.field("seq", pa.int64()),  # the labeller's judgement number, 0, 1, ...: undo takes the highest
    ]
)


def label_folder(cfg: RunConfig) -> Path:
    """label.output, else <output_dir>/labels."""
    return Path(cfg.label.output or Path(cfg.output_dir) / "labels")


def judgement_files(folder: str | Path) -> list[Path]:
    """Every labeller's file of a label folder, decided and abstained; none when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.parquet")) + sorted((folder / ABSTAINED_DIR).glob("*.parquet"))


def read_judgements(folder: str | Path) -> pa.Table:
    """All judgements of a label folder in one JUDGEMENT_SCHEMA table, ordered by labeller and seq."""
    tables = [pq.read_table(f, schema=JUDGEMENT_SCHEMA) for f in judgement_files(folder)]
    table = pa.concat_tables(tables) if tables else JUDGEMENT_SCHEMA.empty_table()
    return table.sort_by([("labeller_id", "ascending"), ("seq", "ascending")])


def human_preferences(folder: str | Path) -> pa.Table:
    """The decided judgements as (prompt, chosen, rejected) rows: what a reward model or DPO trains on. A pair two
    labellers judged gives two rows (their votes; opposite ones cancel in the Bradley-Terry loss)."""
    table = read_judgements(folder)
    decided = pc.is_in(table.column("verdict"), pa.array(DECIDED))
    return table.filter(decided).select(["prompt", "chosen", "rejected"])
