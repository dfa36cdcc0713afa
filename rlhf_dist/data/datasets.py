"""Prompt, demonstration and preference sets: read, validate, tokenise and write, one Arrow record batch at a time.

    spec = DatasetSpec("prefs.jsonl", "preferences", columns={"prompt": "question", "chosen": "good"}, max_tokens=512)
    tokens = tokenize(read_batches(spec), tokenizer, spec)
    write_parquet(tokens, "prefs.tok.parquet")
    print(tokens.report)          # rows read, kept, dropped as over-long

`read_batches` yields canonical string columns (`prompt`, `response`, `chosen`, `rejected`, by kind) and validates
every batch with vectorised pyarrow.compute as it goes; the first bad row stops the read with a `DataError` that
names the file, the 0-based row within that file, the column as the file names it, and the fix.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlhf_dist.data import schema as S
from rlhf_dist.data.chat import ChatFormat, Conversation, is_messages
from rlhf_dist.data.readers import MESSAGES, DataError, MissingColumnError, describe, iter_source, missing_column

log = logging.getLogger(__name__)

KINDS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "demonstrations": ("prompt", "response"),
    "preferences": ("prompt", "chosen", "rejected"),
}
# Provenance rides on each batch's schema metadata, so tokenize() can name the file and row of an over-long row.
META_FILE, META_ROW = b"rlhf_dist.file", b"rlhf_dist.row"

__all__ = [
    "DataError",
    "DatasetSpec",
    "DropReport",
    "KINDS",
    "load_table",
    "read_batches",
    "tokenize",
    "validate",
    "write_parquet",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a set lives and how to read it.

    path: a .jsonl/.jsonl.gz or .parquet file, a folder of such shards, or a `datasets.save_to_disk` folder.
    columns: {canonical name: name in the file}, e.g. {"prompt": "question", "chosen": "good"}; unnamed ones default
    to the canonical name. split: the split of a DatasetDict folder. max_tokens: the longest prompt + answer allowed
    (prompt + the longer of chosen/rejected for preferences); on_overlong: "drop" (counted in the DropReport, logged)
    or "error". batch_size: rows per record batch. json_block_bytes: the JSON reader's block, larger than any row.
    column_key: the config key that names the text column (e.g. "data.prompt_column"), named in errors instead of
    `columns` when the spec comes from a config.
    """

    path: str | os.PathLike
    kind: Literal["prompts", "demonstrations", "preferences"]
    columns: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    max_tokens: int | None = None
    on_overlong: Literal["drop", "error"] = "drop"
    batch_size: int = 1024
    json_block_bytes: int = 8 << 20
    column_key: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec.kind={self.kind!r}; use one of {', '.join(KINDS)}")
        unknown = sorted(set(self.columns) - set(self.names))
        if unknown:
            raise ValueError(
                f"DatasetSpec.columns has {unknown} for kind {self.kind!r}, which reads only "
                f"{list(self.names)}; key columns by those canonical names"
            )
        sources = list(self.source_columns.values())
        if len(set(sources)) != len(sources):
            raise ValueError(
                f"DatasetSpec.columns maps two columns to one source column ({self.source_columns}); "
                f"give each its own column"
            )
        if self.on_overlong not in ("drop", "error"):
            raise ValueError(f"DatasetSpec.on_overlong={self.on_overlong!r}; use 'drop' or 'error'")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"DatasetSpec.max_tokens={self.max_tokens}; use a positive count or None for no limit")
        if self.batch_size < 1 or self.json_block_bytes < 1:
            raise ValueError(
                f"DatasetSpec.batch_size={self.batch_size}, json_block_bytes={self.json_block_bytes}; "
                f"both must be positive"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical text columns of this kind, in order."""
        return KINDS[self.kind]

    @property
    def source_columns(self) -> dict[str, str]:
        """{canonical: name in the file} for every text column of this kind."""
        return {name: self.columns.get(name, name) for name in self.names}


def read_batches(spec: DatasetSpec) -> Iterator[pa.RecordBatch]:
    """Validated record batches with the canonical columns of `spec.kind`, streamed from `spec.path`: each one text
    (string) or, where the file holds conversations, messages lists (`readers.MESSAGES`, role and content only).

    Demonstrations may also come as one `messages` column (TRL's conversational language-modelling rows, when the
    file has no prompt column and spec.columns renames nothing): the last message, an assistant turn, is the
    response, the ones before it the prompt.

    Each batch's schema metadata carries its file and first row (`rlhf_dist.file`, `rlhf_dist.row`).
    """
    wanted = spec.source_columns
    try:
        for file, row, batch in _source_batches(spec, wanted):
            validate(batch, spec, file, row)
            arrays = [_canonical(batch.column(source)) for source in wanted.values()]
            meta = {META_FILE: str(file).encode(), META_ROW: str(row).encode()}
            out_schema = pa.schema([pa.field(n, a.type) for n, a in zip(spec.names, arrays)], metadata=meta)
            yield pa.RecordBatch.from_arrays(arrays, schema=out_schema)
    except MissingColumnError as e:  # the readers know the file, the spec knows which option renames the column
        raise missing_column(e.file, e.canonical, e.source, e.present, spec.column_key) from None


def _source_batches(spec: DatasetSpec, wanted: dict[str, str]) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
    def read(columns: dict[str, str]):
        path = Path(spec.path)
        kwargs = dict(split=spec.split, batch_size=spec.batch_size, json_block_bytes=spec.json_block_bytes)
        return iter_source(path, columns, **kwargs)

    source = read(wanted)
    try:
        first = next(source, None)
    except MissingColumnError as e:
        if not (spec.kind == "demonstrations" and not spec.columns and e.canonical == "prompt"):
            raise
        if MESSAGES_COLUMN not in e.present:
            raise
        for file, row, batch in read({MESSAGES_COLUMN: MESSAGES_COLUMN}):
            yield file, row, _split_last_turn(batch, file, row)
        return
    if first is not None:
        yield first
        yield from source


MESSAGES_COLUMN = "messages"


def _split_last_turn(batch: pa.RecordBatch, file: Path, row: int) -> pa.RecordBatch:
    """A `messages` batch as prompt (every message but the last) and response (the last, an assistant turn)."""
    column = batch.column(MESSAGES_COLUMN)
    where = lambda i: f"{file}: row {row + i}, column {MESSAGES_COLUMN!r}"  # noqa: E731
    if not is_messages(column.type):
        raise DataError(
            f"{where(0)}: type {column.type}, expected a list of {{role, content}} messages; give each row its "
            f"conversation, or prompt and response columns"
        )
    _validate_messages(column, where)
    prompts, responses = [], []
    for i, conversation in enumerate(_canonical(column).to_pylist()):
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise DataError(
                f"{where(i)}: the conversation must end with an assistant message after at least one other (the "
                f"response to learn); fix the row or remove it"
            )
        prompts.append(conversation[:-1])
        responses.append(conversation[-1:])
    arrays = [pa.array(prompts, MESSAGES), pa.array(responses, MESSAGES)]
    return pa.RecordBatch.from_arrays(arrays, names=["prompt", "response"])


def load_table(spec: DatasetSpec) -> pa.Table:
    """The whole validated set as one table: for small sets (tests, evaluation prompts)."""
    batches = [b.replace_schema_metadata(None) for b in read_batches(spec)]
    schema = batches[0].schema if batches else pa.schema([pa.field(name, pa.string()) for name in spec.names])
    for b in batches[1:]:
        if b.schema != schema:
            raise DataError(
                f"{spec.path}: shards hold columns of different kinds ({schema} vs {b.schema}); give every shard "
                f"each column as text, or every shard as messages lists"
            )
    return pa.Table.from_batches(batches, schema=schema)


# --- validation ----------------------------------------------------------------------------------------------------


def validate(batch: pa.RecordBatch, spec: DatasetSpec, file: str | os.PathLike, row_offset: int) -> None:
    """Raise a DataError for the first bad row of `batch`, whose columns are named as in the file (spec.columns).

    Checks, per text column: present, a string type, no nulls, no empty text after stripping whitespace; and for
    preferences, chosen != rejected (after stripping). `row_offset` is the file row of the batch's first row.
    """
    wanted = spec.source_columns
    for canonical, source in wanted.items():
        if source not in batch.schema.names:
            raise missing_column(Path(file), canonical, source, batch.schema.names, spec.column_key)
    stripped = {}
    for canonical, source in wanted.items():
        where = lambda i, c=canonical, s=source: f"{file}: row {row_offset + i}, column {describe(s, c)}"  # noqa: E731
        column = batch.column(source)
        if pa.types.is_null(column.type):
            _fail_first(pa.array(np.ones(len(column), bool)), where, "null", "give every row a value or remove it")
        if is_messages(column.type):
            _validate_messages(column, where)
            continue
        if not _is_text(column.type):
            option = spec.column_key or f"columns={{{canonical!r}: ...}}"
            raise DataError(
                f"{where(0)}: type {column.type}, expected text (string) or a list of {{role, content}} messages; "
                f"convert the column to strings or point {option} at a text column"
            )
        column = _as_string(column)
        _fail_first(column.is_null(), where, "null", "give every row a value or remove it")
        stripped[canonical] = pc.utf8_trim_whitespace(column)
        _fail_first(
            pc.equal(pc.utf8_length(stripped[canonical]), 0),
            where,
            "empty text (after stripping whitespace)",
            "fill it in or remove the row",
        )
    if spec.kind == "preferences" and {"chosen", "rejected"} <= stripped.keys():
        source = wanted["rejected"]
        where = lambda i: f"{file}: row {row_offset + i}, column {describe(source, 'rejected')}"  # noqa: E731
        _fail_first(
            pc.equal(stripped["chosen"], stripped["rejected"]),
            where,
            f"same text as column {describe(wanted['chosen'], 'chosen')}",
            "a pair must differ; remove the row",
        )


def _validate_messages(column: pa.Array, where) -> None:
    """A messages column: every row a non-empty list of messages with text role and content (roles unchecked:
    the template decides which it knows)."""
    fields = {f.name: f.type for f in column.type.value_type}
    for name in ("role", "content"):
        if name not in fields or not _is_text(fields[name]):
            have = ", ".join(f"{k}: {v}" for k, v in fields.items())
            raise DataError(
                f"{where(0)}: messages with fields {{{have}}}, expected {name!r} as text; write each message as "
                f'{{"role": "user", "content": "..."}}'
            )
    _fail_first(column.is_null(), where, "null", "give every row a value or remove it")
    _fail_first(pc.equal(pc.list_value_length(column), 0), where, "an empty messages list", "add a message")
    messages, parents = pc.list_flatten(column), pc.list_parent_indices(column)
    for name in ("role", "content"):
        missing = pc.is_null(pc.struct_field(messages, name))
        hits = pc.sum(pc.cast(missing, pa.int64())).as_py() or 0
        if hits:
            i = pc.index(missing, True).as_py()
            row = parents[i].as_py()
            n = i - pc.index(parents, row).as_py()
            raise DataError(f"{where(row)}: message {n} has no {name}; give every message a role and a content")


def _canonical(column: pa.Array) -> pa.Array:
    """Text as string; messages as MESSAGES (role and content, other fields dropped)."""
    if not is_messages(column.type):
        return _as_string(column)
    messages = pc.list_flatten(column)
    inner = pa.StructArray.from_arrays(
        [_as_string(pc.struct_field(messages, n)) for n in ("role", "content")], names=["role", "content"]
    )
    offsets = pc.subtract(column.offsets, column.offsets[0])  # a slice's offsets start where it starts
    return pa.ListArray.from_arrays(offsets, inner, type=MESSAGES)


def _fail_first(mask: pa.Array, where, problem: str, fix: str) -> None:
    hits = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0  # nulls in the mask (from null rows) count as no hit
    if hits:
        first = pc.index(mask, True).as_py()
        also = f" ({hits} rows of this batch)" if hits > 1 else ""
        raise DataError(f"{where(first)}: {problem}{also}; {fix}")


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _as_string(column: pa.Array) -> pa.Array:
    return column if column.type == pa.string() else pc.cast(column, pa.string())


# --- tokenisation --------------------------------------------------------------------------------------------------

TOKEN_COLUMNS = {"prompt": S.PROMPT_IDS, "response": S.RESPONSE_IDS, "chosen": "chosen_ids", "rejected": "rejected_ids"}


@dataclass
class DropReport:
    """What tokenize() let through: rows read, rows kept, rows dropped as over-long (first few as (file, row))."""

    rows_in: int = 0
    rows_out: int = 0
    dropped_overlong: int = 0
    examples: list[tuple[str, int]] = field(default_factory=list)
    max_examples: int = 10

    def __str__(self) -> str:
        shown = ", ".join(f"{f} row {r}" for f, r in self.examples)
        return f"{self.rows_out} of {self.rows_in} rows kept, {self.dropped_overlong} dropped as over-long" + (
            f" (e.g. {shown})" if shown else ""
        )


class TokenizedBatches:
    """An iterator of token batches whose `.report` (a DropReport) is complete once the iterator is exhausted."""

    def __init__(self, gen_factory, report: DropReport):
        self.report = report
        self._gen = gen_factory(report)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self

    def __next__(self) -> pa.RecordBatch:
        return next(self._gen)


def tokenize(
    batches: Iterable[pa.RecordBatch],
    tokenizer,
    spec: DatasetSpec,
    apply_chat_template: bool | None = None,
    append_eos: bool = True,
    chat: ChatFormat | None = None,
) -> TokenizedBatches:
    """Token batches: the text columns plus `prompt_ids` and `response_ids` / `chosen_ids`, `rejected_ids`
    (`list<int32>`, `rlhf_dist.data.schema.TOKENS`), no padding.

    `chat` (``data.chat_template`` resolved, rlhf_dist.data.chat) says how prompts become text: messages lists go
    through the chat template with the generation prompt appended, and plain text too where it says so; without it,
    a plain-text prompt goes through the tokenizer's template as one user turn when the tokenizer has one
    (apply_chat_template=None) or always (True), or stays plain text with the tokenizer's special tokens (False).
    Answers given as messages are the text the template puts after the prompt; answers are tokenised without special
    tokens and end with EOS (append_eos), so a model trained on them learns to stop. Text columns come out as read, a
    messages column as the text the model sees. A row whose prompt + longest answer exceeds spec.max_tokens is
    dropped and counted in `.report` (a warning with the count is logged at the end) or, with on_overlong="error", a
    DataError.
    """
    if chat is None:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if apply_chat_template and not has_template:
            raise ValueError(
                f"apply_chat_template=True but the tokenizer ({type(tokenizer).__name__}) has no "
                f"chat_template; set tokenizer.chat_template or pass apply_chat_template=False"
            )
        chat = ChatFormat(plain=has_template if apply_chat_template is None else apply_chat_template)
    eos = tokenizer.eos_token_id if append_eos else None
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no eos_token; set one or pass append_eos=False")

    def generate(report: DropReport) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = _tokenize_batch(batch, tokenizer, spec, chat, eos, report)
            if out is not None and out.num_rows:
                yield out
        if report.dropped_overlong:
            log.warning(
                "%s: dropped %d of %d rows longer than max_tokens=%d (prompt + longest answer); %s",
                spec.path,
                report.dropped_overlong,
                report.rows_in,
                spec.max_tokens,
                report,
            )

    return TokenizedBatches(generate, DropReport())


def _tokenize_batch(batch, tokenizer, spec, chat, eos, report: DropReport) -> pa.RecordBatch | None:
    meta = batch.schema.metadata or {}
    file = meta.get(META_FILE, str(spec.path).encode()).decode()
    first_row = int(meta[META_ROW]) if META_ROW in meta else report.rows_in  # batches not from read_batches: count
    report.rows_in += batch.num_rows
    if batch.num_rows == 0:
        return None
    for name in spec.names:
        if name not in batch.schema.names:
            raise ValueError(
                f"tokenize: the batch has columns {batch.schema.names}, not {name!r}; feed it "
                f"read_batches(spec) for kind {spec.kind!r}"
            )
    texts, templated = _model_texts(batch, tokenizer, spec, chat, file, first_row)
    ids = {"prompt": tokenizer(texts["prompt"], add_special_tokens=not templated)["input_ids"]}
    for name in spec.names[1:]:
        answer = tokenizer(texts[name], add_special_tokens=False)["input_ids"]
        ids[name] = answer if eos is None else [x if x[-1:] == [eos] else [*x, eos] for x in answer]
    arrays = {name: _token_array(ids[name]) for name in spec.names}
    # text columns as read; a messages list as the text the model sees
    text = [pa.array(texts[n]) if is_messages(batch.column(n).type) else batch.column(n) for n in spec.names]
    batch = pa.RecordBatch.from_arrays(text, names=list(spec.names))

    if spec.max_tokens is not None:
        lengths = {name: pc.list_value_length(arrays[name]) for name in spec.names}
        answers = [lengths[name] for name in spec.names[1:]]
        longest = pc.max_element_wise(*answers) if answers else 0
        over = pc.greater(pc.add(lengths["prompt"], longest), spec.max_tokens)
        dropped = pc.sum(pc.cast(over, pa.int64())).as_py() or 0
        if dropped and spec.on_overlong == "error":
            i = pc.index(over, True).as_py()
            worst = max(spec.names[1:], key=lambda n: lengths[n][i].as_py(), default="prompt")
            total = lengths["prompt"][i].as_py() + (lengths[worst][i].as_py() if worst != "prompt" else 0)
            label = "prompt" if worst == "prompt" else f"prompt + {worst}"
            raise DataError(
                f"{file}: row {first_row + i}, column {describe(spec.source_columns[worst], worst)}: "
                f"{label} is {total} tokens, over max_tokens={spec.max_tokens}; raise max_tokens, "
                f"shorten the row, or set on_overlong='drop'"
            )
        if dropped:
            report.dropped_overlong += dropped
            for i in np.flatnonzero(over.to_numpy(zero_copy_only=False))[: report.max_examples - len(report.examples)]:
                report.examples.append((file, first_row + int(i)))
            keep = pc.invert(over)
            batch = batch.filter(keep)
            arrays = {name: arr.filter(keep) for name, arr in arrays.items()}

    columns = [batch.column(name) for name in spec.names] + [arrays[name] for name in spec.names]
    fields = [pa.field(name, pa.string()) for name in spec.names] + [
        pa.field(TOKEN_COLUMNS[name], S.TOKENS) for name in spec.names
    ]
    report.rows_out += batch.num_rows
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


def _model_texts(
    batch, tokenizer, spec, chat: ChatFormat, file: str, first_row: int
) -> tuple[dict[str, list[str]], bool]:
    """{column: the texts the model sees}, and whether the prompts came from a template (then they hold the special
    tokens it wrote, and the tokenizer adds none)."""
    columns = {n: batch.column(n) for n in spec.names}

    def where(name: str) -> Callable[[int], str]:
        return lambda i: f"{file}: row {first_row + i}, column {describe(spec.source_columns[name], name)}"

    prompts = columns["prompt"].to_pylist()
    texts = {}
    texts["prompt"], templated = chat.prompts(tokenizer, prompts, where("prompt"))
    conversations: list[Conversation] | None = None
    for name in spec.names[1:]:
        if not is_messages(columns[name].type):
            texts[name] = columns[name].to_pylist()
            continue
        if conversations is None:
            if not templated:
                raise DataError(
                    f"{where(name)(0)}: a messages list, but the prompt column holds plain text that "
                    f"{chat.key} leaves untemplated; give the prompt as messages too, or the answer as text"
                )
            conversations = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        answers = columns[name].to_pylist()
        texts[name] = chat.completions(tokenizer, conversations, texts["prompt"], answers, where(name))
    return texts, templated


def _token_array(ids: list[list[int]]) -> pa.Array:
    """Ragged ids as list<int32> built from one flat buffer and offsets, not from per-row Python lists."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=S.TOKENS)


# --- writing -------------------------------------------------------------------------------------------------------


def write_parquet(batches: Iterable[pa.RecordBatch], path: str | os.PathLike, schema: pa.Schema | None = None) -> int:
    """Stream batches into one Parquet file and return the row count.

    Written to `<path>.tmp` and renamed over `path` only when every batch is in, so `path` holds either the complete
    set or whatever was there before; on any error the temporary file is removed. With no batches, `schema` gives
    the empty file its columns (without it, an empty stream is an error: nothing says what the columns are).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer, rows = None, 0
    try:
        for batch in batches:
            batch = batch.replace_schema_metadata(None)  # per-batch provenance would make every schema differ
            if writer is None:
                writer = pq.ParquetWriter(tmp, schema.remove_metadata() if schema is not None else batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
        if writer is None:
            if schema is None:
                raise ValueError(f"{path}: no batches to write and no schema; pass schema= to write an empty set")
            writer = pq.ParquetWriter(tmp, schema.remove_metadata())
        writer.close()
        os.replace(tmp, path)  # atomic on one file system: readers see the old file or the new one
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        tmp.unlink(missing_ok=True)
        raise
    return rows
