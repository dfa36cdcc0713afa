"""Arrow batches between roles, and the tensors each worker makes of them at its edge.

A batch is a ``pa.RecordBatch`` whose columns follow ``rlhf_dist.data.schema`` (a ``pa.Table`` is accepted wherever
a batch is read). Ragged columns are turned into padded tensors and back through the list offsets and the flat
values buffer with numpy, never row by row, so conversion cost does not grow with Python overhead per sample.
Sliced arrays (``batch.slice(i, n)``) share their parent's values buffer and start at a non-zero offset; every
reader here goes through ``_ragged``, which rebases the offsets, so slices convert like fresh arrays.

Ragged columns must be null-free: an empty sequence is an empty list, not a null.

The joined-sequence layout of ``to_sequences`` is the one in docs/CONTRACTS.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rlhf_dist.data.schema import FIELDS, PER_TOKEN_COLUMNS, PROMPT_IDS, RESPONSE_IDS

Batch = pa.RecordBatch | pa.Table

_SIDES = ("right", "left")


# ---------------------------------------------------------------------------------------------------------------
# building batches


def make_batch(columns: Mapping[str, Any]) -> pa.RecordBatch:
    """A record batch from ``{name: values}``, columns in the given order.

    Known column names get their schema type: values may be a Python sequence, a 1-D numpy array or tensor, or a
    ``pa.Array`` (cast safely to the schema type). A column not in the schema must come as a ``pa.Array``, whose
    type is kept. All columns must have the same number of rows.
    """
    if not columns:
        raise ValueError("make_batch needs at least one column; got an empty mapping")
    arrays = [_to_arrow(name, values) for name, values in columns.items()]
    lengths = {name: len(arr) for name, arr in zip(columns, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"make_batch: columns have different numbers of rows: {lengths}; every column needs one value per row"
        )
    schema = pa.schema([pa.field(name, arr.type) for name, arr in zip(columns, arrays)])
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def empty_like(batch: Batch) -> Batch:
    """A zero-row batch with the same schema."""
    return batch.slice(0, 0)


def num_tokens(batch: Batch, columns: Sequence[str] = (PROMPT_IDS, RESPONSE_IDS)) -> np.ndarray:
    """Tokens per row summed over the ragged ``columns``: int64 ``[B]``."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in columns:
        arr = _list_column(batch, column)
        total += pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return total


def merge_columns(batch: Batch, *parts: Batch) -> Batch:
    """``batch`` with every column of ``parts`` appended (one row per row: the parts come from the same rows)."""
    for part in parts:
        for name in part.schema.names:
            batch = batch.append_column(part.schema.field(name), part.column(name))
    return batch


def add_column(batch: Batch, name: str, values: Any) -> Batch:
    """The batch with column ``name`` set to ``values`` (replacing a column of that name, else appended).

    ``values``: a ``pa.Array``, a 1-D numpy array / tensor / list with one value per row, or, for a ragged schema
    column, a right-padded 2-D tensor or array ``[B, T]`` (T >= longest response) whose row i keeps its first
    ``len(response_ids[i])`` entries. Per-token columns must match ``response_ids`` row by row in length.
    """
    target = FIELDS.get(name)
    if _is_2d(values):
        if target is None or not _is_list_type(target):
            raise ValueError(
                f"add_column: 2-D values for column {name!r} need a ragged (list) schema column; "
                f"{name!r} is {target or 'not in the schema'}. Pass one value per row instead"
            )
        if RESPONSE_IDS not in batch.schema.names:
            raise ValueError(
                f"add_column: padded values for {name!r} take their row lengths from "
                f"{RESPONSE_IDS!r}, which this batch lacks; pass a pa.ListArray instead"
            )
        lengths = num_tokens(batch, (RESPONSE_IDS,))
        shape = tuple(values.shape)
        if shape[0] != batch.num_rows:
            raise ValueError(f"add_column: {name!r} has {shape[0]} rows, the batch has {batch.num_rows}")
        if lengths.size and shape[1] < lengths.max():
            raise ValueError(
                f"add_column: {name!r} is {shape[0]}x{shape[1]} but the longest response has "
                f"{int(lengths.max())} tokens; pad it to at least that width"
            )
        values = from_padded(values, lengths, side="right", dtype=target.value_type)

    arr = _to_arrow(name, values)
    if len(arr) != batch.num_rows:
        raise ValueError(
            f"add_column: column {name!r} has {len(arr)} rows, the batch has {batch.num_rows}; give one value per row"
        )
    if name in PER_TOKEN_COLUMNS and RESPONSE_IDS in batch.schema.names:
        got = _lengths(arr)
        want = num_tokens(batch, (RESPONSE_IDS,))
        bad = np.flatnonzero(got != want)
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"add_column: per-token column {name!r} row {row} has {int(got[row])} values but "
                f"{RESPONSE_IDS!r} has {int(want[row])} tokens ({bad.size} rows differ); a per-token "
                "column needs one value per response token"
            )

    new_field = pa.field(name, arr.type)
    arrays = list(batch.columns)
    if name in batch.schema.names:
        i = batch.schema.get_field_index(name)
        arrays[i] = arr
        schema = batch.schema.set(i, new_field)
    else:
        arrays.append(arr)
        schema = batch.schema.append(new_field)
    return type(batch).from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------------------------------------------
# ragged <-> padded


def to_padded(
    batch: Batch,
    column: str,
    pad_value: float = 0,
    side: str = "right",
    dtype: torch.dtype = torch.int64,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``column`` as a padded tensor ``[B, L]`` of ``dtype`` and its mask ``[B, L]`` bool (True = real).

    ``L`` is the longest row, or ``length`` when given (must be >= the longest row). ``side="right"`` puts each
    row's values first; ``"left"`` puts them last (pads first).
    """
    _check_side(side)
    arr = _list_column(batch, column)
    if pa.types.is_floating(arr.type.value_type) and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"to_padded: column {column!r} holds {arr.type.value_type} values; converting to {dtype} "
            "would truncate them, ask for a floating dtype (e.g. torch.float32)"
        )
    offsets, values = _ragged(arr, column)
    lengths = np.diff(offsets)
    longest = int(lengths.max(initial=0))
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(
            f"to_padded: length={length} is shorter than the longest row of {column!r} "
            f"({longest} values); pass length >= {longest} or None"
        )
    rows, cols = _scatter_index(offsets)
    if side == "left":
        cols = cols + (length - lengths)[rows]
    out = np.full((len(lengths), length), pad_value, dtype=_numpy_work_dtype(dtype))
    out[rows, cols] = values
    mask = np.zeros((len(lengths), length), dtype=np.bool_)
    mask[rows, cols] = True
    return torch.from_numpy(out).to(dtype), torch.from_numpy(mask)


def from_padded(
    tensor: torch.Tensor | np.ndarray, lengths_or_mask: Any, side: str = "right", dtype: pa.DataType | None = None
) -> pa.ListArray:
    """The inverse of ``to_padded``: ``tensor [B, L]`` back to a ``list<dtype>`` array of B rows.

    ``lengths_or_mask`` is either ``lengths [B]`` (row i keeps its first ``lengths[i]`` entries for
    ``side="right"``, its last ones for ``"left"``) or a bool ``mask [B, L]`` (row i keeps its masked entries in
    order; ``side`` is then unused).
    """
    dtype = pa.float32() if dtype is None else dtype
    _check_side(side)
    if not isinstance(dtype, pa.DataType):
        raise TypeError(f"from_padded: dtype must be a pyarrow type such as pa.float32() or pa.int32(), got {dtype!r}")
    t = _as_tensor(tensor)
    if t.dim() != 2:
        raise ValueError(f"from_padded: tensor must be 2-D [B, L], got shape {tuple(t.shape)}")
    batch_size, width = t.shape
    spec = _as_tensor(lengths_or_mask)
    if spec.dim() == 2:
        if spec.dtype != torch.bool or tuple(spec.shape) != tuple(t.shape):
            raise ValueError(
                f"from_padded: a mask must be bool with the tensor's shape {tuple(t.shape)}, got "
                f"{spec.dtype} {tuple(spec.shape)}"
            )
        mask = spec
        lengths = mask.sum(dim=1)
    elif spec.dim() == 1:
        if spec.dtype.is_floating_point or spec.dtype == torch.bool:
            raise TypeError(f"from_padded: lengths must be integers, got {spec.dtype}")
        if spec.shape[0] != batch_size:
            raise ValueError(f"from_padded: {spec.shape[0]} lengths for a tensor of {batch_size} rows")
        lengths = spec.to(torch.int64)
        if batch_size and (lengths.min() < 0 or lengths.max() > width):
            raise ValueError(
                f"from_padded: lengths must lie in [0, {width}] (the tensor's width), got "
                f"min {int(lengths.min())} max {int(lengths.max())}"
            )
        positions = torch.arange(width)
        if side == "right":
            mask = positions[None, :] < lengths[:, None]
        else:
            mask = positions[None, :] >= (width - lengths)[:, None]
    else:
        raise ValueError(f"from_padded: expected lengths [B] or a mask [B, L], got shape {tuple(spec.shape)}")

    picked = t[mask]  # row-major, so each row's values come out in order and rows follow each other
    if pa.types.is_floating(dtype):
        work = torch.float64 if dtype == pa.float64() else torch.float32
    elif pa.types.is_integer(dtype):
        if t.dtype.is_floating_point:
            raise TypeError(
                f"from_padded: a {t.dtype} tensor cannot become {dtype} without truncation; round it "
                "first or ask for a floating pyarrow type"
            )
        work = torch.int64
    else:
        raise TypeError(f"from_padded: dtype must be a pyarrow integer or floating type, got {dtype}")
    values = pa.array(picked.to(work).numpy(), type=dtype)  # a safe cast: int overflow raises
    offsets = np.zeros(batch_size + 1, dtype=np.int64)
    np.cumsum(lengths.numpy(), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


# ---------------------------------------------------------------------------------------------------------------
# the joined sequence (docs/CONTRACTS.md)


@dataclasses.dataclass
class Sequences:
    """Prompt + response of every row, right-padded: the tensors every role computes on.

    B rows, L = longest prompt + response, T = longest response (0 when every response is empty).
    """

    input_ids: torch.Tensor  # [B, L] int64, pad_token_id after each row's last token
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token
    position_ids: torch.Tensor  # [B, L] int64, 0..len-1 on real tokens, 0 on pads
    prompt_lens: torch.Tensor  # [B] int64, >= 1
    response_lens: torch.Tensor  # [B] int64, >= 0
    response_mask: torch.Tensor  # [B, T] bool, True = real response token

    def response_index(self) -> torch.Tensor:
        """``[B, T]`` int64: position in ``input_ids`` whose logits predict response token t of row i.

        ``prompt_lens[i] + t - 1`` for real tokens, 0 on padding, so ``logits.gather(1, idx[..., None].expand(...))``
        is always in range; mask the result with ``response_mask``.
        """
        steps = torch.arange(self.response_mask.shape[1], device=self.prompt_lens.device)
        index = self.prompt_lens[:, None] + steps[None, :] - 1
        return index.masked_fill(~self.response_mask, 0)

    def response_tokens(self) -> torch.Tensor:
        """``[B, T]`` int64: the response token ids (0 on padding), the targets for ``response_index`` logits."""
        tokens = self.input_ids.gather(1, self.response_index() + 1)
        return tokens.masked_fill(~self.response_mask, 0)

    def last_token_index(self) -> torch.Tensor:
        """``[B]`` int64: position of each row's last real token (the one the reward model scores)."""
        return self.prompt_lens + self.response_lens - 1

    def to(self, device: torch.device | str) -> Sequences:
        """All tensors moved to ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def to_sequences(batch: Batch, pad_token_id: int) -> Sequences:
    """Join ``prompt_ids`` and ``response_ids`` row by row into right-padded ``Sequences``.

    Every prompt needs at least one token: the first response token is predicted from the last prompt token.
    """
    if not isinstance(pad_token_id, (int, np.integer)) or isinstance(pad_token_id, bool):
        raise TypeError(
            f"to_sequences: pad_token_id must be an int, got {pad_token_id!r} (a tokenizer without a "
            "pad token can use its eos id)"
        )
    p_offsets, p_values = _ragged(_list_column(batch, PROMPT_IDS), PROMPT_IDS)
    r_offsets, r_values = _ragged(_list_column(batch, RESPONSE_IDS), RESPONSE_IDS)
    prompt_lens = np.diff(p_offsets)
    response_lens = np.diff(r_offsets)
    empty = np.flatnonzero(prompt_lens == 0)
    if empty.size:
        raise ValueError(
            f"to_sequences: {PROMPT_IDS!r} row {int(empty[0])} is empty ({empty.size} rows are); "
            "every prompt needs at least one token (e.g. BOS) to predict the first response token"
        )
    total = prompt_lens + response_lens
    batch_size = len(total)
    width = int(total.max(initial=0))
    longest_response = int(response_lens.max(initial=0))

    input_ids = np.full((batch_size, width), pad_token_id, dtype=np.int64)
    rows, cols = _scatter_index(p_offsets)
    input_ids[rows, cols] = p_values
    rows, cols = _scatter_index(r_offsets)
    input_ids[rows, prompt_lens[rows] + cols] = r_values

    positions = np.arange(width, dtype=np.int64)
    real = positions[None, :] < total[:, None]
    response_mask = np.arange(longest_response)[None, :] < response_lens[:, None]
    return Sequences(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(real.astype(np.int64)),
        position_ids=torch.from_numpy(np.where(real, positions[None, :], 0)),
        prompt_lens=torch.from_numpy(prompt_lens.astype(np.int64)),
        response_lens=torch.from_numpy(response_lens.astype(np.int64)),
        response_mask=torch.from_numpy(response_mask),
    )


# ---------------------------------------------------------------------------------------------------------------
# splitting and joining


def split_balanced(
    batch: Batch, n: int, token_columns: Sequence[str] = (PROMPT_IDS, RESPONSE_IDS)
) -> tuple[list[Batch], list[np.ndarray]]:
    """``n`` shards with balanced token counts; shard sizes differ by at most one row.

    Rows are dealt in rounds of ``n``, heaviest first: within a round the heaviest row goes to the lightest shard.
    Each round gives every shard one row, so sizes stay within one (data-parallel learners take the same number of
    steps), and the spread of shard token counts never exceeds the heaviest single row.

    Returns ``(shards, index)``: ``index[k]`` (int64, ascending) are the original row numbers of shard k, whose
    rows keep their original relative order. ``concat_in_order(shards, index)`` restores the batch.
    """
    _check_parts(n, batch.num_rows, "split_balanced")
    tokens = num_tokens(batch, token_columns)
    order = np.argsort(-tokens, kind="stable")
    loads = np.zeros(n, dtype=np.int64)
    assignment = np.empty(len(tokens), dtype=np.int64)
    # one Python step per round of n rows, each vectorised over the n shards; rounds depend on earlier loads
    for start in range(0, len(order), n):
        rows = order[start : start + n]
        lightest = np.argsort(loads, kind="stable")[: len(rows)]
        assignment[rows] = lightest
        loads[lightest] += tokens[rows]
    index = [np.flatnonzero(assignment == k).astype(np.int64) for k in range(n)]
    return [batch.take(pa.array(idx)) for idx in index], index


def split_even(batch: Batch, n: int) -> list[Batch]:
    """``n`` contiguous zero-copy slices whose sizes differ by at most one row (the first ones are larger)."""
    _check_parts(n, batch.num_rows, "split_even")
    size, extra = divmod(batch.num_rows, n)
    sizes = [size + 1] * extra + [size] * (n - extra)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [batch.slice(int(start), count) for start, count in zip(starts, sizes)]


def concat_in_order(shards: Sequence[Batch], index: Sequence[np.ndarray]) -> pa.RecordBatch:
    """Undo ``split_balanced``: row ``index[k][j]`` of the result is row j of ``shards[k]``."""
    if len(shards) != len(index):
        raise ValueError(f"concat_in_order: {len(shards)} shards but {len(index)} index arrays")
    for k, (shard, idx) in enumerate(zip(shards, index)):
        if shard.num_rows != len(idx):
            raise ValueError(f"concat_in_order: shard {k} has {shard.num_rows} rows but its index has {len(idx)}")
    order = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in index]) if index else np.zeros(0, np.int64)
    total = len(order)
    if total and (order.min() < 0 or order.max() >= total or np.bincount(order, minlength=total).max() != 1):
        raise ValueError(
            f"concat_in_order: the index arrays are not a permutation of 0..{total - 1}; pass the "
            "index returned by split_balanced unchanged"
        )
    inverse = np.empty(total, dtype=np.int64)
    inverse[order] = np.arange(total)
    return concat_batches(shards).take(pa.array(inverse))


def concat_batches(batches: Sequence[Batch]) -> pa.RecordBatch:
    """One record batch of all rows, in order; later batches' columns are reordered to the first's.

    Every batch must have the same column names and types; a mismatch names the column and the batch.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch (use empty_like for an empty one)")
    batches = [_as_record_batch(b) for b in batches]
    schema = batches[0].schema
    aligned = [batches[0]]
    for k, b in enumerate(batches[1:], start=1):
        missing = [name for name in schema.names if name not in b.schema.names]
        extra = [name for name in b.schema.names if name not in schema.names]
        if missing or extra:
            raise ValueError(
                f"concat_batches: batch {k} lacks columns {missing} and has extra columns {extra} "
                "compared with batch 0; give every batch the same columns"
            )
        for f in schema:
            other = b.schema.field(f.name).type
            if other != f.type:
                raise TypeError(
                    f"concat_batches: column {f.name!r} is {f.type} in batch 0 but {other} in batch "
                    f"{k}; build batches with make_batch so schema columns share one type"
                )
        aligned.append(b.select(schema.names))
    if hasattr(pa, "concat_batches"):
        return pa.concat_batches(aligned)
    return _as_record_batch(pa.Table.from_batches(aligned, schema=schema))


def repeat_interleave(batch: Batch, n: int) -> Batch:
    """Each row repeated ``n`` times in place (rows 0,0,..,1,1,..): n samples per prompt."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"repeat_interleave: n must be an int >= 1 (samples per prompt), got {n!r}")
    return batch.take(pa.array(np.repeat(np.arange(batch.num_rows, dtype=np.int64), n)))


# ---------------------------------------------------------------------------------------------------------------
# internals


def _list_column(batch: Batch, column: str) -> pa.Array:
    """The null-free list array of ``column`` (chunks combined)."""
    if column not in batch.schema.names:
        raise KeyError(f"batch has no column {column!r}; it has {batch.schema.names}")
    arr = batch.column(column)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not _is_list_type(arr.type):
        raise TypeError(f"column {column!r} is {arr.type}, expected a list column such as list<int32>")
    if arr.null_count:
        raise ValueError(f"column {column!r} has {arr.null_count} null rows; use an empty list for an empty sequence")
    return arr


def _ragged(arr: pa.Array, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [B+1] int64 starting at 0, values [N])`` of a null-free list array, honouring its slice offset."""
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    # .offsets follows the slice but .values is the parent's whole buffer: cut it to this slice's span
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if values.null_count:
        raise ValueError(
            f"column {column!r} has {values.null_count} null values inside its rows; fill them "
            "(e.g. 0 or NaN) before building the batch"
        )
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def _scatter_index(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every flat value: ``(row, position within its row)``, both ``[N]`` int64."""
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    cols = np.arange(int(offsets[-1]), dtype=np.int64) - offsets[:-1][rows]
    return rows, cols


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _to_arrow(name: str, values: Any) -> pa.Array:
    """``values`` as an Arrow array of column ``name``'s schema type (or its own type for a pa.Array)."""
    target = FIELDS.get(name)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        arr = values
        if target is not None and arr.type != target:
            try:
                arr = arr.cast(target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise TypeError(
                    f"column {name!r} must be {target}, got {values.type} that does not cast safely "
                    f"({err}); convert the values first"
                ) from None
    elif target is None:
        raise ValueError(
            f"unknown column {name!r}: pass it as a pa.Array with an explicit type, or add it to "
            "rlhf_dist.data.schema.FIELDS"
        )
    else:
        if isinstance(values, torch.Tensor):
            values = _as_tensor(values).numpy()
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise ValueError(
                f"column {name!r} needs one value per row (1-D), got shape {values.shape}; padded 2-D "
                "per-token values go through add_column or from_padded"
            )
        try:
            arr = pa.array(values, type=target)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            raise TypeError(f"column {name!r} must be {target}; could not convert the given values ({err})") from None
    if _is_list_type(arr.type):
        if arr.null_count:
            raise ValueError(f"column {name!r} has {arr.null_count} null rows; use an empty list for an empty sequence")
        if arr.flatten().null_count:
            raise ValueError(f"column {name!r} has null values inside its rows; fill them (e.g. 0 or NaN)")
    return arr


def _as_tensor(x: Any) -> torch.Tensor:
    """A CPU tensor without grad; half precision widened to float32 since numpy has no bfloat16."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t


def _numpy_work_dtype(dtype: torch.dtype) -> type:
    """The numpy dtype to fill before converting to ``dtype`` (numpy lacks bfloat16, torch bool is scattered as int)."""
    if dtype == torch.float64:
        return np.float64
    if dtype.is_floating_point:
        return np.float32
    if dtype.is_complex:
        raise TypeError(f"to_padded: complex dtype {dtype} is not supported")
    return np.int64


def _is_2d(values: Any) -> bool:
    return isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim == 2


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _as_record_batch(b: Batch) -> pa.RecordBatch:
    if isinstance(b, pa.RecordBatch):
        return b
    if not isinstance(b, pa.Table):
        raise TypeError(f"expected a pa.RecordBatch or pa.Table, got {type(b).__name__}")
    parts = b.combine_chunks().to_batches()
    if len(parts) == 1:
        return parts[0]
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in b.schema], schema=b.schema)


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def _check_parts(n: int, rows: int, who: str) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{who}: n must be an int >= 1, got {n!r}")
    if n > rows:
        raise ValueError(
            f"{who}: cannot split {rows} rows into {n} shards (each shard needs at least one row); "
            f"use n <= {rows} or a bigger batch"
        )
