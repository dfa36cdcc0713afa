"""Arrow batch helpers: expected numbers are written out by hand or rebuilt with a plain per-row loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlhf_dist.data.batch import (
    Sequences,
    add_column,
    concat_batches,
    concat_in_order,
    empty_like,
    from_padded,
    make_batch,
    num_tokens,
    repeat_interleave,
    split_balanced,
    split_even,
    to_padded,
    to_sequences,
)

PAD = 99


def small_batch() -> pa.RecordBatch:
    return make_batch(
        {
            "sample_id": [10, 11, 12, 13],
            "prompt_ids": [[1, 2, 3], [4], [5, 6], [7, 8]],
            "response_ids": [[21, 22], [], [23, 24, 25], [26]],
            "rollout_logprobs": [[-0.5, -1.5], [], [-0.25, -2.0, -3.0], [-4.0]],
            "reward": [1.0, 0.0, -1.0, 0.5],
        }
    )


def random_batch(rng: np.random.Generator, rows: int, max_prompt: int = 12, max_response: int = 9) -> pa.RecordBatch:
    prompts = [rng.integers(1, 500, size=rng.integers(1, max_prompt + 1)).tolist() for _ in range(rows)]
    responses = [rng.integers(1, 500, size=rng.integers(0, max_response + 1)).tolist() for _ in range(rows)]
    return make_batch({"sample_id": list(range(rows)), "prompt_ids": prompts, "response_ids": responses})


# --- make_batch --------------------------------------------------------------------------------------------------


def test_make_batch_uses_schema_types():
    b = small_batch()
    assert b.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert b.schema.field("rollout_logprobs").type == pa.list_(pa.float32())
    assert b.schema.field("reward").type == pa.float32()
    assert b.schema.field("sample_id").type == pa.int64()
    assert b.schema.names == ["sample_id", "prompt_ids", "response_ids", "rollout_logprobs", "reward"]
    # a pa.Array of a castable type is cast to the schema type
    b2 = make_batch({"prompt_ids": pa.array([[1, 2]], pa.list_(pa.int64()))})
    assert b2.schema.field("prompt_ids").type == pa.list_(pa.int32())


def test_make_batch_errors_name_the_column():
    with pytest.raises(ValueError, match="unknown column 'foo'.*pa.Array"):
        make_batch({"foo": [1, 2]})
    kept = make_batch({"foo": pa.array([1.5, 2.5], pa.float64())})
    assert kept.schema.field("foo").type == pa.float64()
    with pytest.raises(ValueError, match="different numbers of rows"):
        make_batch({"sample_id": [1, 2], "reward": [1.0]})
    with pytest.raises(ValueError, match="'prompt_ids' has 1 null rows"):
        make_batch({"prompt_ids": [[1], None]})
    with pytest.raises(TypeError, match="'sample_id'.*does not cast safely"):
        make_batch({"sample_id": pa.array([1.5])})
    with pytest.raises(TypeError, match="'reward' must be float"):
        make_batch({"reward": ["high", "low"]})


# --- padded <-> ragged --------------------------------------------------------------------------------------------


def test_to_padded_int_right_and_left_by_hand():
    b = small_batch()
    right, rmask = to_padded(b, "prompt_ids", pad_value=0, side="right")
    assert right.dtype == torch.int64
    assert right.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 0]]
    assert rmask.tolist() == [[True, True, True], [True, False, False], [True, True, False], [True, True, False]]
    left, lmask = to_padded(b, "prompt_ids", pad_value=-1, side="left")
    assert left.tolist() == [[1, 2, 3], [-1, -1, 4], [-1, 5, 6], [-1, 7, 8]]
    assert lmask.tolist() == [[True, True, True], [False, False, True], [False, True, True], [False, True, True]]
    wide, _ = to_padded(b, "response_ids", side="left", length=4)
    assert wide.tolist() == [[0, 0, 21, 22], [0, 0, 0, 0], [0, 23, 24, 25], [0, 0, 0, 26]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_round_trip_int_and_float(side):
    b = small_batch()
    for column, torch_dtype, pa_dtype in [
        ("prompt_ids", torch.int64, pa.int32()),
        ("response_ids", torch.int32, pa.int32()),
        ("rollout_logprobs", torch.float32, pa.float32()),
    ]:
        padded, mask = to_padded(b, column, side=side, dtype=torch_dtype)
        assert padded.dtype == torch_dtype
        by_lengths = from_padded(padded, mask.sum(1), side=side, dtype=pa_dtype)
        by_mask = from_padded(padded, mask, dtype=pa_dtype)
        assert by_lengths.type == pa.list_(pa_dtype)
        assert by_lengths.to_pylist() == b.column(column).to_pylist()
        assert by_mask.to_pylist() == b.column(column).to_pylist()


def test_float_padding_and_values_by_hand():
    padded, mask = to_padded(small_batch(), "rollout_logprobs", pad_value=float("nan"), dtype=torch.float32)
    expected = torch.tensor([[-0.5, -1.5, np.nan], [np.nan] * 3, [-0.25, -2.0, -3.0], [-4.0, np.nan, np.nan]])
    torch.testing.assert_close(padded, expected, equal_nan=True)
    assert mask.sum(1).tolist() == [2, 0, 3, 1]


def test_from_padded_by_hand_and_errors():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert from_padded(t, [2, 0]).to_pylist() == [[1.0, 2.0], []]
    assert from_padded(t, [1, 3], side="left").to_pylist() == [[3.0], [4.0, 5.0, 6.0]]
    assert from_padded(t.to(torch.bfloat16), [3, 1]).to_pylist() == [[1.0, 2.0, 3.0], [4.0]]
    assert from_padded(torch.tensor([[7, 8]]), [2], dtype=pa.int32()).type == pa.list_(pa.int32())
    with pytest.raises(TypeError, match="truncation"):
        from_padded(t, [1, 1], dtype=pa.int32())
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        from_padded(t, [4, 0])
    with pytest.raises(ValueError, match="2 lengths for a tensor of 1 rows"):
        from_padded(t[:1], [1, 1])
    with pytest.raises(ValueError, match="side must be"):
        from_padded(t, [1, 1], side="middle")


def test_to_padded_errors():
    b = small_batch()
    with pytest.raises(ValueError, match="length=2 is shorter than the longest row of 'prompt_ids' \\(3"):
        to_padded(b, "prompt_ids", length=2)
    with pytest.raises(TypeError, match="'rollout_logprobs'.*floating dtype"):
        to_padded(b, "rollout_logprobs", dtype=torch.int64)
    with pytest.raises(KeyError, match="no column 'values'"):
        to_padded(b, "values")
    with pytest.raises(TypeError, match="'reward' is float"):
        to_padded(b, "reward")
    nulls = pa.record_batch({"prompt_ids": pa.array([[1], None], pa.list_(pa.int32()))})
    with pytest.raises(ValueError, match="'prompt_ids' has 1 null rows"):
        to_padded(nulls, "prompt_ids")


def test_sliced_batch_matches_per_row_loop():
    b = small_batch().slice(1, 3)  # rows [4], [5, 6], [7, 8]: offset 3 into the parent's values
    for side in ("right", "left"):
        padded, mask = to_padded(b, "prompt_ids", side=side)
        rows = b.column("prompt_ids").to_pylist()
        width = max(len(r) for r in rows)
        expected = [r + [0] * (width - len(r)) if side == "right" else [0] * (width - len(r)) + r for r in rows]
        assert padded.tolist() == expected
        assert from_padded(padded, mask, dtype=pa.int32()).to_pylist() == rows
    padded, _ = to_padded(b, "rollout_logprobs", dtype=torch.float32)
    assert padded.tolist() == [[0.0, 0.0, 0.0], [-0.25, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert num_tokens(b).tolist() == [1, 5, 3]


def test_table_with_chunks_reads_like_a_batch():
    b = small_batch()
    table = pa.Table.from_batches([b.slice(0, 2), b.slice(2, 2)])
    padded, _ = to_padded(table, "response_ids")
    assert padded.tolist() == [[21, 22, 0], [0, 0, 0], [23, 24, 25], [26, 0, 0]]


def test_num_tokens_and_empty_like():
    b = small_batch()
    assert num_tokens(b).tolist() == [5, 1, 5, 3]
    assert num_tokens(b, ("response_ids",)).tolist() == [2, 0, 3, 1]
    e = empty_like(b)
    assert e.num_rows == 0 and e.schema == b.schema
    padded, mask = to_padded(e, "prompt_ids")
    assert tuple(padded.shape) == (0, 0) and tuple(mask.shape) == (0, 0)


# --- joined sequences ---------------------------------------------------------------------------------------------


def loop_sequences(batch: pa.RecordBatch, pad: int) -> dict:
    """The CONTRACTS.md layout built one row at a time, to check the vectorised version against."""
    prompts = batch.column("prompt_ids").to_pylist()
    responses = batch.column("response_ids").to_pylist()
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    longest = max(len(r) for r in responses)
    out = {k: [] for k in ("input_ids", "attention_mask", "position_ids", "response_mask", "response_index", "last")}
    for p, r in zip(prompts, responses):
        row = p + r
        n = len(row)
        out["input_ids"].append(row + [pad] * (width - n))
        out["attention_mask"].append([1] * n + [0] * (width - n))
        out["position_ids"].append(list(range(n)) + [0] * (width - n))
        out["response_mask"].append([t < len(r) for t in range(longest)])
        out["response_index"].append([len(p) + t - 1 if t < len(r) else 0 for t in range(longest)])
        out["last"].append(n - 1)
    out["prompt_lens"] = [len(p) for p in prompts]
    out["response_lens"] = [len(r) for r in responses]
    return out


def test_to_sequences_by_hand():
    seqs = to_sequences(small_batch(), pad_token_id=PAD)
    # L = 5: the longest rows are 3 + 2 and 2 + 3 tokens
    assert seqs.input_ids.tolist() == [
        [1, 2, 3, 21, 22],
        [4, PAD, PAD, PAD, PAD],
        [5, 6, 23, 24, 25],
        [7, 8, 26, PAD, PAD],
    ]
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert seqs.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    assert seqs.prompt_lens.tolist() == [3, 1, 2, 2]
    assert seqs.response_lens.tolist() == [2, 0, 3, 1]
    assert seqs.response_mask.dtype == torch.bool
    assert seqs.response_mask.tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, True],
        [True, False, False],
    ]
    assert seqs.response_index().tolist() == [[2, 3, 0], [0, 0, 0], [1, 2, 3], [1, 0, 0]]
    assert seqs.last_token_index().tolist() == [4, 0, 4, 2]
    assert seqs.response_tokens().tolist() == [[21, 22, 0], [0, 0, 0], [23, 24, 25], [26, 0, 0]]
    for t in (seqs.input_ids, seqs.attention_mask, seqs.position_ids, seqs.prompt_lens, seqs.response_lens):
        assert t.dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_sequences_matches_per_row_loop(seed):
    rng = np.random.default_rng(seed)
    full = random_batch(rng, 17)
    for batch in (full, full.slice(3, 9)):
        seqs = to_sequences(batch, pad_token_id=PAD)
        want = loop_sequences(batch, PAD)
        assert seqs.input_ids.tolist() == want["input_ids"]
        assert seqs.attention_mask.tolist() == want["attention_mask"]
        assert seqs.position_ids.tolist() == want["position_ids"]
        assert seqs.prompt_lens.tolist() == want["prompt_lens"]
        assert seqs.response_lens.tolist() == want["response_lens"]
        assert seqs.response_mask.tolist() == want["response_mask"]
        assert seqs.response_index().tolist() == want["response_index"]
        assert seqs.last_token_index().tolist() == want["last"]


def test_response_index_gathers_the_logits_that_predict_each_token():
    rng = np.random.default_rng(7)
    batch = random_batch(rng, 9)
    seqs = to_sequences(batch, pad_token_id=0)
    vocab = 500
    # a perfect next-token model: the logits at position p put all mass on input_ids[p + 1]
    nxt = torch.roll(seqs.input_ids, shifts=-1, dims=1)
    logits = torch.nn.functional.one_hot(nxt, vocab).float()
    idx = seqs.response_index()
    picked = logits.gather(1, idx[..., None].expand(-1, -1, vocab)).argmax(-1)
    assert picked[seqs.response_mask].tolist() == [t for row in batch.column("response_ids").to_pylist() for t in row]
    # the same positions read the target token itself from input_ids, shifted by one
    assert seqs.input_ids.gather(1, idx + 1)[seqs.response_mask].tolist() == picked[seqs.response_mask].tolist()


def test_to_sequences_ragged_edges():
    one = make_batch({"prompt_ids": [[5]], "response_ids": [[6, 7]]})
    seqs = to_sequences(one, pad_token_id=0)
    assert seqs.input_ids.tolist() == [[5, 6, 7]]
    assert seqs.response_index().tolist() == [[0, 1]]
    assert seqs.last_token_index().tolist() == [2]

    all_empty = make_batch({"prompt_ids": [[1, 2], [3]], "response_ids": [[], []]})
    seqs = to_sequences(all_empty, pad_token_id=0)
    assert tuple(seqs.response_mask.shape) == (2, 0)
    assert tuple(seqs.response_index().shape) == (2, 0)
    assert tuple(seqs.response_tokens().shape) == (2, 0)
    assert seqs.input_ids.tolist() == [[1, 2], [3, 0]]
    assert seqs.last_token_index().tolist() == [1, 0]

    with pytest.raises(ValueError, match="'prompt_ids' row 1 is empty"):
        to_sequences(make_batch({"prompt_ids": [[1], []], "response_ids": [[2], [3]]}), pad_token_id=0)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        to_sequences(one, pad_token_id=None)


def test_sequences_to_device_keeps_values():
    seqs = to_sequences(small_batch(), pad_token_id=PAD).to("cpu")
    assert isinstance(seqs, Sequences) and seqs.input_ids[1, 0].item() == 4


# --- splitting and joining ----------------------------------------------------------------------------------------


def test_split_balanced_by_hand():
    # tokens per row 5, 1, 4, 2, 3, 3. Rounds of two, heaviest to the lightest shard:
    # (r0=5 -> s0, r2=4 -> s1), loads 5/4; (r4=3 -> s1, r5=3 -> s0), loads 8/7; (r3=2 -> s1, r1=1 -> s0), 9/9.
    b = make_batch(
        {
            "sample_id": list(range(6)),
            "prompt_ids": [[1, 1, 1], [1], [1, 1], [1], [1, 1], [1]],
            "response_ids": [[2, 2], [], [2, 2], [2], [2], [2, 2]],
        }
    )
    shards, index = split_balanced(b, 2)
    assert [i.tolist() for i in index] == [[0, 1, 5], [2, 3, 4]]
    assert [s.column("sample_id").to_pylist() for s in shards] == [[0, 1, 5], [2, 3, 4]]
    assert [int(num_tokens(s).sum()) for s in shards] == [9, 9]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_split_balanced_properties(seed, n):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(n, 60))
    batch = random_batch(rng, rows, max_prompt=40, max_response=30)
    tokens = num_tokens(batch)
    shards, index = split_balanced(batch, n)
    assert len(shards) == n == len(index)
    sizes = [s.num_rows for s in shards]
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(index).tolist()) == list(range(rows))
    for shard, idx in zip(shards, index):
        assert np.all(np.diff(idx) > 0)  # original relative order inside a shard
        assert shard.column("sample_id").to_pylist() == idx.tolist()
    loads = [int(tokens[idx].sum()) for idx in index]
    assert max(loads) - min(loads) <= tokens.max()
    naive = [int(s.sum()) for s in np.array_split(tokens, n)]
    assert max(loads) - min(loads) <= max(naive) - min(naive)
    restored = concat_in_order(shards, index)
    assert restored.to_pydict() == batch.to_pydict()


def test_split_balanced_spread_beats_naive_on_skewed_batch():
    # sorted long-to-short rows: a contiguous split puts all long rows on shard 0
    lengths = list(range(40, 0, -1))
    b = make_batch({"prompt_ids": [[1] * k for k in lengths], "response_ids": [[] for _ in lengths]})
    shards, index = split_balanced(b, 4)
    loads = [int(num_tokens(s).sum()) for s in shards]
    assert sum(loads) == sum(lengths)
    naive = [sum(c) for c in np.array_split(np.array(lengths), 4)]
    assert max(naive) - min(naive) == 300  # 355 - 55
    assert max(loads) - min(loads) <= 10


def test_split_errors():
    b = small_batch()
    with pytest.raises(ValueError, match="cannot split 4 rows into 5 shards"):
        split_balanced(b, 5)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        split_balanced(b, 0)
    with pytest.raises(ValueError, match="cannot split 4 rows into 5 shards"):
        split_even(b, 5)
    shards, index = split_balanced(b, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        concat_in_order(shards, [index[0], index[0]])
    with pytest.raises(ValueError, match="shard 0 has 2 rows but its index has 1"):
        concat_in_order(shards, [index[0][:1], index[1]])


def test_split_even_contiguous():
    b = make_batch({"sample_id": list(range(7))})
    parts = split_even(b, 3)
    assert [p.column("sample_id").to_pylist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p.num_rows for p in split_even(b, 7)] == [1] * 7
    assert concat_batches(parts).to_pydict() == b.to_pydict()


def test_concat_batches_unifies_and_names_mismatch():
    a = make_batch({"sample_id": [1], "reward": [0.5]})
    b = make_batch({"reward": [1.5], "sample_id": [2]})
    both = concat_batches([a, b])
    assert both.schema.names == ["sample_id", "reward"]
    assert both.to_pydict() == {"sample_id": [1, 2], "reward": [0.5, 1.5]}
    wrong = pa.record_batch({"sample_id": pa.array([3], pa.int32()), "reward": pa.array([1.0], pa.float32())})
    with pytest.raises(TypeError, match="column 'sample_id' is int64 in batch 0 but int32 in batch 1"):
        concat_batches([a, wrong])
    with pytest.raises(ValueError, match=r"batch 1 lacks columns \['reward'\]"):
        concat_batches([a, make_batch({"sample_id": [3]})])
    with pytest.raises(ValueError, match="at least one batch"):
        concat_batches([])


def test_repeat_interleave():
    b = make_batch({"group_id": [7, 8], "prompt_ids": [[1], [2, 3]]})
    r = repeat_interleave(b, 3)
    assert r.column("group_id").to_pylist() == [7, 7, 7, 8, 8, 8]
    assert r.column("prompt_ids").to_pylist() == [[1], [1], [1], [2, 3], [2, 3], [2, 3]]
    assert repeat_interleave(b.slice(1, 1), 2).column("prompt_ids").to_pylist() == [[2, 3], [2, 3]]
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        repeat_interleave(b, 0)


# --- add_column ---------------------------------------------------------------------------------------------------


def test_add_column_from_each_kind():
    b = small_batch()
    out = add_column(b, "gold_reward", np.array([1.0, 2.0, 3.0, 4.0]))
    assert out.schema.field("gold_reward").type == pa.float32()
    assert out.column("gold_reward").to_pylist() == [1.0, 2.0, 3.0, 4.0]
    out = add_column(out, "policy_version", [3, 3, 3, 3])
    assert out.schema.names[-2:] == ["gold_reward", "policy_version"]
    out = add_column(out, "reward", torch.tensor([0.0, 0.5, 1.0, 1.5]))  # replaces, keeps position
    assert out.schema.names.index("reward") == b.schema.names.index("reward")
    assert out.column("reward").to_pylist() == [0.0, 0.5, 1.0, 1.5]
    # padded per-token values [B, T]: each row keeps len(response_ids[i]) leading entries
    values = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    out = add_column(out, "values", values)
    assert out.schema.field("values").type == pa.list_(pa.float32())
    assert out.column("values").to_pylist() == [[0.0, 1.0], [], [8.0, 9.0, 10.0], [12.0]]
    extra = add_column(b, "my_flag", pa.array([True, False, True, False]))
    assert extra.schema.field("my_flag").type == pa.bool_()


def test_add_column_on_sliced_batch():
    b = small_batch().slice(1, 3)
    out = add_column(b, "advantages", torch.tensor([[9.0, 9.0, 9.0], [1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]))
    assert out.column("advantages").to_pylist() == [[], [1.0, 2.0, 3.0], [4.0]]


def test_add_column_errors():
    b = small_batch()
    with pytest.raises(ValueError, match="column 'reward' has 3 rows, the batch has 4"):
        add_column(b, "reward", [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="'reward' must be float"):
        add_column(b, "reward", ["a", "b", "c", "d"])
    with pytest.raises(TypeError, match="'sample_id' must be int64"):
        add_column(b, "sample_id", pa.array([0.5, 1.5, 2.5, 3.5]))
    with pytest.raises(ValueError, match="per-token column 'values' row 1 has 1 values but 'response_ids' has 0"):
        add_column(b, "values", pa.array([[1.0, 2.0], [1.0], [1.0, 2.0, 3.0], [1.0]]))
    with pytest.raises(ValueError, match="longest response has 3 tokens"):
        add_column(b, "values", torch.zeros(4, 2))
    with pytest.raises(ValueError, match="'values' has 3 rows, the batch has 4"):
        add_column(b, "values", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="2-D values for column 'reward' need a ragged"):
        add_column(b, "reward", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unknown column 'bogus'"):
        add_column(b, "bogus", [1, 2, 3, 4])
    no_response = make_batch({"prompt_ids": [[1]]})
    with pytest.raises(ValueError, match="lacks"):
        add_column(no_response, "values", torch.zeros(1, 1))
