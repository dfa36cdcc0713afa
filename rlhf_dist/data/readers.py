"""Streaming readers for JSONL, Parquet and `datasets.save_to_disk` folders, straight to Arrow record batches.

Every reader yields `SourceBatch(file, row_offset, batch)`: a record batch holding only the requested source columns
(under their names in the file), the file it came from and the 0-based index of its first row within that file, so
an error anywhere downstream can name the file and the row. Nothing here builds a whole set in memory: JSONL goes
through pyarrow's block-wise JSON reader, Parquet through `ParquetFile.iter_batches`, Hugging Face Arrow files through
a memory-mapped IPC reader. The `datasets` library is never imported; its on-disk layout is read as documented by
its `save_to_disk`: `state.json` lists the `data-*.arrow` shards (Arrow IPC streams) in order, and a `DatasetDict`
folder holds `dataset_dict.json` (`{"splits": [...]}`) and one such folder per split.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"
_JSON_ERROR = re.compile(r"Column\((?P<col>[^)]*)\) (?P<what>.*?) in row (?P<row>\d+)")
_JSON_ROW = re.compile(r"^(?P<what>.*) in row (?P<row>\d+)$")
_UTF8_INDEX = re.compile(r"Invalid UTF8 sequence at string index (?P<index>\d+)")
# A column of conversations (TRL's format): each row a list of {role, content} messages; other fields are dropped.
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class DataError(ValueError):
    """Bad input data. The message is one line naming the file, the row (0-based) and the column, and the fix."""


class MissingColumnError(DataError):
    """A requested column is not in the file; the fields let a caller name its own option in the fix."""

    def __init__(self, message: str, file: Path, canonical: str, source: str, present: list[str]):
        super().__init__(message)
        self.file, self.canonical, self.source, self.present = file, canonical, source, present


class SourceBatch(NamedTuple):
    file: Path
    row_offset: int  # 0-based index, within `file`, of the batch's first row
    batch: pa.RecordBatch  # only the requested source columns, named as in the file


def describe(column: str, canonical: str) -> str:
    """`'question' (the prompt column)` when renamed, `'prompt'` otherwise: the user sees the name in their file."""
    return f"{column!r}" if column == canonical else f"{column!r} (the {canonical} column)"


def missing_column(
    file: Path, canonical: str, source: str, present: list[str], key: str | None = None
) -> MissingColumnError:
    """`key`: the config key that names the column (e.g. data.prompt_column), else the data spec's `columns`."""
    fix = f"set {key} to one of those" if key else f"set columns={{{canonical!r}: '<one of those>'}} in the data spec"
    return MissingColumnError(
        f"{file}: row 0, column {describe(source, canonical)}: no such column; the file has columns "
        f"{', '.join(map(repr, present)) or '(none)'}; {fix}",
        file,
        canonical,
        source,
        present,
    )


def first_invalid_utf8(column: pa.Array) -> int | None:
    """Index of the first string in `column` that is not valid UTF-8 (None if all are, or it holds no text).

    pyarrow's JSON, Parquet and IPC readers all let such bytes through; they fail later, far from the file.
    """
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not any(is_(column.type) for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)):
        return None
    try:
        column.validate(full=True)
        return None
    except pa.ArrowInvalid as e:
        m = _UTF8_INDEX.search(str(e))
        if m:
            return int(m["index"])
    for i in range(len(column)):  # a message in another wording: find the row one string at a time
        try:
            column.slice(i, 1).validate(full=True)
        except pa.ArrowInvalid:
            return i
    return None


def _first_invalid_utf8_row(column: pa.Array) -> int | None:
    """first_invalid_utf8 by row, also for a messages column (its roles and contents)."""
    if not (pa.types.is_list(column.type) and pa.types.is_struct(column.type.value_type)):
        return first_invalid_utf8(column)
    messages = column.flatten()
    parents = pc.list_parent_indices(column)
    for i in range(messages.type.num_fields):
        bad = first_invalid_utf8(messages.field(i))
        if bad is not None:
            return parents[bad].as_py()
    return None


def iter_source(
    path: Path, wanted: dict[str, str], *, split: str | None, batch_size: int, json_block_bytes: int
) -> Iterator[SourceBatch]:
    """Batches of at most `batch_size` rows holding the source columns `wanted` ({canonical: source}), file by file.

    `path` is a JSONL or Parquet file, a folder of such shards (read in name order), a `save_to_disk` folder, or a
    `DatasetDict` folder (pick the split with `split`). A missing column is a `DataError` before any row is read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; point the data spec's path at a .jsonl or .parquet "
            f"file, or a folder written by datasets' save_to_disk"
        )
    hf_files = _hf_files(path, split)
    if hf_files is not None:
        for file in hf_files:
            yield from _utf8_checked(_rechunk(_read_arrow(file, wanted), batch_size), wanted)
        return
    if split is not None:
        raise ValueError(
            f"{path}: split={split!r} applies only to a DatasetDict folder (with {HF_DICT}); "
            f"this is not one, so remove split from the data spec"
        )
    for file in _shards(path):
        if file.name.endswith(PARQUET_SUFFIXES):
            reader = _read_parquet(file, wanted, batch_size)
        else:
            reader = _read_jsonl(file, wanted, json_block_bytes)
        yield from _utf8_checked(_rechunk(reader, batch_size), wanted)


def _rechunk(reader: Iterator[SourceBatch], batch_size: int) -> Iterator[SourceBatch]:
    # Readers return batches of their own size (a JSON block, a 1000-row HF batch); zero-copy slices bound the rows
    # that tokenisation and validation hold at once, whatever the format.
    for item in reader:
        for start in range(0, item.batch.num_rows, batch_size):
            yield SourceBatch(item.file, item.row_offset + start, item.batch.slice(start, batch_size))


def _utf8_checked(reader: Iterator[SourceBatch], wanted: dict[str, str]) -> Iterator[SourceBatch]:
    for item in reader:
        for canonical, source in wanted.items():
            bad = _first_invalid_utf8_row(item.batch.column(source))
            if bad is not None:
                row, where = item.row_offset + bad, ""
                fix = "write the column as UTF-8 text (decode the bytes with their real encoding first)"
                if item.file.name.endswith(JSONL_SUFFIXES):
                    where, fix = f" (line {_line_of_row(item.file, row)})", "re-encode the file as UTF-8 (iconv)"
                raise DataError(
                    f"{item.file}: row {row}{where}, column {describe(source, canonical)}: bytes that are not "
                    f"UTF-8; {fix}"
                )
        yield item


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        if not path.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            raise ValueError(
                f"{path}: unknown format {''.join(path.suffixes)!r}; use JSON Lines "
                f"({', '.join(JSONL_SUFFIXES)}), Parquet ({', '.join(PARQUET_SUFFIXES)}) or a "
                f"save_to_disk folder"
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
    kinds = {p.name.endswith(PARQUET_SUFFIXES) for p in files}
    if not files:
        raise ValueError(
            f"{path}: folder has no .jsonl or .parquet files and no {HF_STATE} or {HF_DICT}; point the "
            f"data spec at a data file or a folder written by datasets' save_to_disk"
        )
    if len(kinds) > 1:
        raise ValueError(f"{path}: folder mixes JSON Lines and Parquet shards; keep one format per folder")
    return files


# --- Hugging Face save_to_disk -------------------------------------------------------------------------------------


def _hf_files(path: Path, split: str | None) -> list[Path] | None:
    """The Arrow shards of a save_to_disk folder in order, or None when `path` is not one."""
    if not path.is_dir():
        return None
    if (path / HF_DICT).is_file():
        splits = _load_json(path / HF_DICT).get("splits") or sorted(
            p.name for p in path.iterdir() if (p / HF_STATE).is_file()
        )
        if split is None:
            if len(splits) != 1:
                raise ValueError(
                    f"{path}: DatasetDict with splits {splits}; set split to one of them in the data spec, or point "
                    f"the path at that split's folder"
                )
            split = splits[0]
        if split not in splits or not (path / split / HF_STATE).is_file():
            raise ValueError(f"{path}: no split {split!r}; the splits are {splits}; set split to one of them")
        return _hf_files(path / split, None)
    if not (path / HF_STATE).is_file():
        return None
    state = _load_json(path / HF_STATE)
    if split is not None and state.get("_split") not in (None, split):
        raise ValueError(
            f"{path}: this folder holds split {state['_split']!r}, not {split!r}; "
            f"remove split from the data spec or point path at the DatasetDict folder"
        )
    if state.get("_indices_data_files"):
        # Old `datasets` saved shuffles/selections as an indices file over the full table; reading the table raw
        # would silently return the wrong rows.
        raise ValueError(
            f"{path / HF_STATE}: the set was saved with an indices mapping; re-save it with a recent "
            f"`datasets` (or call .flatten_indices() before save_to_disk)"
        )
    names = [entry["filename"] for entry in state.get("_data_files") or []]
    if not names:
        raise ValueError(f"{path / HF_STATE}: lists no _data_files; re-save the set with datasets' save_to_disk")
    files = []
    for name in names:
        if Path(name).name != name:
            raise ValueError(f"{path / HF_STATE}: shard name {name!r} is not a plain file name; fix state.json")
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / HF_STATE}: lists shard {name!r}, which is missing; restore it or re-save")
        files.append(path / name)
    return files


def _load_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read ({e}); re-save the set with datasets' save_to_disk") from e


def _read_arrow(file: Path, wanted: dict[str, str]) -> Iterator[SourceBatch]:
    source = pa.memory_map(str(file))  # batches reference the mapped file: no copy into process memory
    # `datasets` writes IPC streams; accept the IPC file format too (it starts with the magic "ARROW1").
    reader = pa.ipc.open_file(source) if source.read(6) == b"ARROW1" else None
    source.seek(0)
    if reader is None:
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    else:
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    columns = _select(file, reader.schema.names, wanted)
    row = 0
    for batch in batches:
        yield SourceBatch(file, row, batch.select(columns))
        row += batch.num_rows


def _select(file: Path, present: list[str], wanted: dict[str, str]) -> list[str]:
    for canonical, source in wanted.items():
        if source not in present:
            raise missing_column(file, canonical, source, present)
    return list(wanted.values())


# --- Parquet -------------------------------------------------------------------------------------------------------


def _read_parquet(file: Path, wanted: dict[str, str], batch_size: int) -> Iterator[SourceBatch]:
    parquet = pq.ParquetFile(file)
    columns = _select(file, parquet.schema_arrow.names, wanted)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        yield SourceBatch(file, row, batch)
        row += batch.num_rows


# --- JSON Lines ----------------------------------------------------------------------------------------------------


def _read_jsonl(file: Path, wanted: dict[str, str], block_bytes: int) -> Iterator[SourceBatch]:
    first = _first_record(file)
    if first is None:
        return  # an empty file adds no rows
    _select(file, list(first), wanted)
    # An explicit schema for the wanted columns keeps a null-only first block from fixing the type to null; other
    # fields are ignored, so a key that first appears late cannot break the block-wise type inference. A column is
    # text, or a messages list (role/content objects, TRL's conversational format) when the first row holds a list.
    schema = pa.schema([pa.field(s, MESSAGES if isinstance(first[s], list) else pa.string()) for s in wanted.values()])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    row = 0
    try:
        for batch in pj.open_json(file, read_options=pj.ReadOptions(block_size=block_bytes), parse_options=options):
            yield SourceBatch(file, row, batch.select(list(wanted.values())))
            row += batch.num_rows
    except pa.ArrowInvalid as e:
        raise _json_error(file, row, str(e), wanted, block_bytes, schema) from e


def _first_record(file: Path) -> dict | None:
    """The first object of the file, read with the json module: only one line, for the missing-column check.

    Read as bytes: bad UTF-8 in a requested column is reported with its row by the batch check, wherever it is.
    """
    with _open_bytes(file) as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
                except ValueError as e:
                    raise DataError(
                        f"{file}: row 0 (line {number}): not valid JSON ({e}); the file must be JSON Lines, "
                        f"one object per line"
                    ) from e
                if not isinstance(record, dict):
                    raise DataError(
                        f"{file}: row 0 (line {number}): a JSON {type(record).__name__}, not an object; the file "
                        f"must be JSON Lines, one object per line (convert a JSON array with `jq -c '.[]'`)"
                    )
                return record
    return None


def _open_bytes(file: Path):
    return gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb")


def _line_of_row(file: Path, row: int) -> int:
    """The 1-based line of JSONL row `row` (0-based): pyarrow's rows skip blank lines. Read only for an error."""
    seen, number = -1, 0
    with _open_bytes(file) as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number
    return number + 1  # past the last complete line: an unterminated last row


def _json_error(
    file: Path, block_start: int, message: str, wanted: dict[str, str], block_bytes: int, schema: pa.Schema
) -> DataError:
    # pyarrow counts rows from the start of the failing block; the block starts right after the rows yielded so far.
    names = {source: canonical for canonical, source in wanted.items()}
    if "straddles" in message:
        return DataError(
            f"{file}: row {block_start} or later: one row is longer than the JSON block of {block_bytes} "
            f"bytes; raise json_block_bytes in the data spec"
        )
    m = _JSON_ERROR.search(message)
    if m:
        source, _, inner = m["col"].lstrip("/").partition("/")  # /prompt/[]/content: a field of a message
        column = describe(source, names.get(source, source))
        where = f"{file}: row {block_start + int(m['row'])}, column {column}"
        if source in schema.names and schema.field(source).type == MESSAGES:
            return DataError(
                f"{where}: {inner + ' ' if inner else ''}{m['what']}, expected a list of {{role, content}} messages "
                f"with text content (as in row 0); give every row of the column in that form"
            )
        return DataError(f"{where}: {m['what']}, expected text (as in row 0); store the column as JSON strings")
    m = _JSON_ROW.search(message.strip())
    if m:
        row = block_start + int(m["row"])
        # rapidjson says "Invalid encoding in string" for a string that runs to the end of its line.
        hint = " (an unclosed string?)" if "Invalid encoding" in m["what"] else ""
        return DataError(
            f"{file}: row {row} (line {_line_of_row(file, row)}): {m['what']}{hint}; fix that line (one JSON "
            f"object per line)"
        )
    return DataError(f"{file}: row {block_start} or later: {message}; fix the file (one JSON object per line)")
