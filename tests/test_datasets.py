"""Dataset reading, validation, tokenisation and writing (rlhf_dist.data.datasets / readers).

Every format is written here by hand, the save_to_disk layout included (Arrow IPC streams + state.json +
dataset_info.json, as `datasets` writes them), so the tests need neither the `datasets` library nor the network.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_dist.data import schema as S
from rlhf_dist.data.datasets import DataError, DatasetSpec, load_table, read_batches, tokenize, write_parquet

PREFS = {
    "prompt": ["what is one plus one", "name a colour", "say hello"],
    "chosen": ["two", "red", "hello"],
    "rejected": ["three", "seven", "goodbye"],
}


# --- writers for each on-disk format -------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: dict[str, list], gz: bool = False) -> Path:
    names = list(rows)
    lines = [json.dumps({n: rows[n][i] for n in names}) for i in range(len(rows[names[0]]))]
    text = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_pq(path: Path, rows: dict[str, list], row_group: int | None = None) -> Path:
    pq.write_table(pa.table(rows), path, row_group_size=row_group)
    return path


def write_hf(
    folder: Path, rows: dict[str, list], *, split: str | None = None, shards: int = 1, batch_rows: int = 1000
) -> Path:
    """A `Dataset.save_to_disk` folder: data-0000i-of-0000n.arrow IPC streams, dataset_info.json, state.json."""
    folder.mkdir(parents=True)
    table = pa.table(rows)
    features = {n: {"dtype": "string", "_type": "Value"} for n in rows}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = table.replace_schema_metadata(meta)
    per = -(-table.num_rows // shards)
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.ipc.new_stream(folder / name, table.schema) as writer:
            for batch in table.slice(i * per, per).to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    (folder / "dataset_info.json").write_text(
        json.dumps({"citation": "", "description": "", "features": features, "homepage": "", "license": ""}, indent=2)
    )
    (folder / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": n} for n in names],
                "_fingerprint": "0123456789abcdef",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": split,
            },
            indent=2,
            sort_keys=True,
        )
    )
    return folder


def write_as(fmt: str, tmp_path: Path, rows: dict[str, list], **kw) -> Path:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if fmt == "jsonl.gz":
        return write_jsonl(tmp_path / "data.jsonl.gz", rows, gz=True)
    if fmt == "parquet":
        return write_pq(tmp_path / "data.parquet", rows)
    return write_hf(tmp_path / "saved", rows, **kw)


FORMATS = ["jsonl", "jsonl.gz", "parquet", "save_to_disk"]


def error_of(spec: DatasetSpec) -> str:
    with pytest.raises(DataError) as info:
        load_table(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- reading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_the_same_preference_table(tmp_path, fmt):
    path = write_as(fmt, tmp_path, {**PREFS, "extra": ["a", "b", "c"]})
    table = load_table(DatasetSpec(path, "preferences"))
    assert table.schema == pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    assert table.to_pydict() == PREFS


@pytest.mark.parametrize("fmt", FORMATS)
def test_renamed_columns_come_out_canonical(tmp_path, fmt):
    path = write_as(fmt, tmp_path, {"question": PREFS["prompt"], "answer": PREFS["chosen"]})
    spec = DatasetSpec(path, "demonstrations", columns={"prompt": "question", "response": "answer"})
    assert load_table(spec).to_pydict() == {"prompt": PREFS["prompt"], "response": PREFS["chosen"]}


def test_prompt_set_reads_only_the_prompt_column(tmp_path):
    path = write_pq(tmp_path / "p.parquet", PREFS)
    assert load_table(DatasetSpec(path, "prompts")).column_names == ["prompt"]


def test_dataset_dict_folder_picks_the_split(tmp_path):
    root = tmp_path / "dd"
    write_hf(root / "train", PREFS, split="train")
    write_hf(root / "test", {k: v[:1] for k, v in PREFS.items()}, split="test")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert load_table(DatasetSpec(root, "preferences", split="test")).num_rows == 1
    assert load_table(DatasetSpec(root, "preferences", split="train")).num_rows == 3
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; set split"):
        load_table(DatasetSpec(root, "preferences"))
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_table(DatasetSpec(root, "preferences", split="dev"))


def test_split_on_a_plain_file_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PREFS)
    with pytest.raises(ValueError, match="remove split"):
        load_table(DatasetSpec(path, "prompts", split="train"))


def test_folder_of_shards_reads_in_name_order_and_errors_name_the_shard(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", {"prompt": ["a", "b"]})
    bad = write_jsonl(folder / "part-1.jsonl", {"prompt": ["c", "  "]})
    with pytest.raises(DataError, match=rf"{bad}: row 1, column 'prompt': empty text"):
        load_table(DatasetSpec(folder, "prompts"))
    write_jsonl(bad, {"prompt": ["c", "d"]})
    assert load_table(DatasetSpec(folder, "prompts")).column("prompt").to_pylist() == ["a", "b", "c", "d"]


# --- validation: every bad case names file, row and column ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column_lists_the_columns_and_the_option(tmp_path, fmt):
    path = write_as(fmt, tmp_path, {"question": ["q"], "good": ["a"], "bad": ["b"]})
    msg = error_of(DatasetSpec(path, "preferences", columns={"prompt": "question", "chosen": "good"}))
    assert str(path.name) in msg and "row 0" in msg and "'rejected'" in msg
    assert "'question', 'good', 'bad'" in msg and "columns={'rejected':" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_text_after_strip(tmp_path, fmt):
    path = write_as(fmt, tmp_path, {"question": ["fine", "also fine", " \t\n "]})
    msg = error_of(DatasetSpec(path, "prompts", columns={"prompt": "question"}))
    assert path.name in msg and "row 2" in msg and "'question' (the prompt column)" in msg and "empty text" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_text(tmp_path, fmt):
    rows = {"prompt": ["p0", "p1"], "response": ["r0", None]}
    path = write_as(fmt, tmp_path, rows)
    msg = error_of(DatasetSpec(path, "demonstrations"))
    assert path.name in msg and "row 1, column 'response': null" in msg


def test_null_from_a_missing_key_in_a_later_jsonl_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    assert "row 1, column 'response': null" in error_of(DatasetSpec(path, "demonstrations"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_chosen_equal_to_rejected(tmp_path, fmt):
    rows = {**PREFS, "rejected": ["three", "red ", "goodbye"]}  # row 1 differs only by trailing whitespace
    path = write_as(fmt, tmp_path, rows)
    msg = error_of(DatasetSpec(path, "preferences"))
    assert path.name in msg and "row 1, column 'rejected': same text as column 'chosen'" in msg


def test_non_string_column_in_parquet(tmp_path):
    path = write_pq(tmp_path / "p.parquet", {"prompt": [1, 2]})
    msg = error_of(DatasetSpec(path, "prompts"))
    assert str(path) in msg and "row 0, column 'prompt': type int64, expected text" in msg


def test_non_string_value_in_jsonl_names_the_global_row(tmp_path):
    rows = {"prompt": [f"prompt number {i}" for i in range(40)]}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    lines = path.read_text().splitlines()
    lines[33] = '{"prompt": 33}'
    path.write_text("\n".join(lines) + "\n")
    # Blocks of 128 bytes hold a few rows each, so row 33 sits well inside a later block.
    msg = error_of(DatasetSpec(path, "prompts", json_block_bytes=128))
    assert str(path) in msg and "row 33, column 'prompt'" in msg and "expected text" in msg


def test_jsonl_that_is_a_json_array_is_explained(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "a"}]')
    assert "JSON Lines" in error_of(DatasetSpec(path, "prompts"))


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="DatasetSpec.kind='pairs'"):
        DatasetSpec("x", "pairs")
    with pytest.raises(ValueError, match=r"\['chosen'\] for kind 'prompts'"):
        DatasetSpec("x", "prompts", columns={"chosen": "good"})
    with pytest.raises(ValueError, match="on_overlong"):
        DatasetSpec("x", "prompts", on_overlong="truncate")


# --- streaming -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_streams_several_batches_and_error_rows_are_global(tmp_path, fmt):
    n = 10
    rows = {"prompt": [f"p{i}" for i in range(n)], "response": [f"r{i}" for i in range(n)]}
    path = write_as(fmt, tmp_path, rows, **({"batch_rows": 4} if fmt == "save_to_disk" else {}))
    spec = DatasetSpec(path, "demonstrations", batch_size=3)
    batches = list(read_batches(spec))
    # save_to_disk files hold 4-row IPC batches here; slicing never merges batches, so 4 + 4 + 2 becomes 3,1,3,1,2.
    expected = [3, 1, 3, 1, 2] if fmt == "save_to_disk" else [3, 3, 3, 1]
    assert [b.num_rows for b in batches] == expected
    assert [b.schema.metadata[b"rlhf_dist.row"] for b in batches][:2] == [b"0", b"3"]

    rows["response"][8] = ""
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = write_as(fmt, bad_dir, rows, **({"batch_rows": 4} if fmt == "save_to_disk" else {}))
    msg = error_of(DatasetSpec(bad, "demonstrations", batch_size=3))
    assert "row 8, column 'response': empty text" in msg


def test_save_to_disk_shards_number_rows_per_shard(tmp_path):
    rows = {"prompt": [f"p{i}" for i in range(6)]}
    rows["prompt"][4] = None
    folder = write_hf(tmp_path / "saved", rows, shards=2)
    msg = error_of(DatasetSpec(folder, "prompts"))
    assert "data-00001-of-00002.arrow: row 1, column 'prompt': null" in msg


# --- tokenisation --------------------------------------------------------------------------------------------------

WORDS = [
    "<unk>",
    "</s>",
    "user",
    "assistant",
    ":",
    "what",
    "is",
    "one",
    "plus",
    "two",
    "three",
    "name",
    "a",
    "colour",
    "red",
    "seven",
    "say",
    "hello",
    "goodbye",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", chat_template=chat_template
    )


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", PREFS)


def test_chat_template_applied_to_the_prompt_when_present(prefs_file):
    spec = DatasetSpec(prefs_file, "preferences")
    tokens = tokenize(read_batches(spec), make_tokenizer(TEMPLATE), spec)
    table = pa.Table.from_batches(list(tokens))
    assert table.schema.field("prompt_ids").type == S.TOKENS
    assert table.schema.field("chosen_ids").type == S.TOKENS and table.schema.field("rejected_ids").type == S.TOKENS
    assert table.column("prompt_ids")[1].as_py() == ids("user", ":", "name", "a", "colour", "assistant", ":")
    assert table.column("chosen_ids")[1].as_py() == ids("red", "</s>")
    assert table.column("rejected_ids")[2].as_py() == ids("goodbye", "</s>")
    assert table.column("prompt").to_pylist() == PREFS["prompt"]
    assert tokens.report.rows_in == tokens.report.rows_out == 3


def test_no_chat_template_when_absent_or_disabled(prefs_file):
    spec = DatasetSpec(prefs_file, "preferences")
    for tok, flag in ((make_tokenizer(None), None), (make_tokenizer(TEMPLATE), False)):
        table = pa.Table.from_batches(list(tokenize(read_batches(spec), tok, spec, apply_chat_template=flag)))
        assert table.column("prompt_ids")[1].as_py() == ids("name", "a", "colour")
    with pytest.raises(ValueError, match="has no chat_template"):
        tokenize(read_batches(spec), make_tokenizer(None), spec, apply_chat_template=True)


def test_demonstrations_get_response_ids(tmp_path):
    path = write_pq(tmp_path / "d.parquet", {"prompt": ["say hello"], "response": ["hello"]})
    spec = DatasetSpec(path, "demonstrations")
    (batch,) = tokenize(read_batches(spec), make_tokenizer(None), spec)
    assert batch.schema.names == ["prompt", "response", S.PROMPT_IDS, S.RESPONSE_IDS]
    assert batch.column(S.RESPONSE_IDS).to_pylist() == [ids("hello", "</s>")]


def test_overlong_rows_are_dropped_and_counted(prefs_file, caplog):
    # Without the template: prompts are 5, 3, 2 tokens; longest answers (with EOS) 2, 2, 2 -> totals 7, 5, 4.
    spec = DatasetSpec(prefs_file, "preferences", max_tokens=5, batch_size=2)
    tokens = tokenize(read_batches(spec), make_tokenizer(None), spec)
    with caplog.at_level(logging.WARNING, logger="rlhf_dist.data.datasets"):
        table = pa.Table.from_batches(list(tokens))
    assert table.column("prompt").to_pylist() == PREFS["prompt"][1:]
    report = tokens.report
    assert (report.rows_in, report.rows_out, report.dropped_overlong) == (3, 2, 1)
    assert report.examples == [(str(prefs_file), 0)]
    assert "dropped 1 of 3 rows" in caplog.text


def test_overlong_rows_refused_with_file_row_and_column(tmp_path):
    rows = {"question": PREFS["prompt"], "chosen": PREFS["chosen"], "rejected": PREFS["rejected"]}
    rows["rejected"] = ["three", "seven", "hello hello hello hello goodbye"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = DatasetSpec(
        path, "preferences", columns={"prompt": "question"}, max_tokens=7, on_overlong="error", batch_size=2
    )
    with pytest.raises(DataError) as info:
        list(tokenize(read_batches(spec), make_tokenizer(None), spec))
    msg = str(info.value)
    assert str(path) in msg and "row 2, column 'rejected': prompt + rejected is 8 tokens, over max_tokens=7" in msg


# --- writing -------------------------------------------------------------------------------------------------------


def test_write_parquet_round_trips_the_token_table(prefs_file, tmp_path):
    spec = DatasetSpec(prefs_file, "preferences", batch_size=2)
    out = tmp_path / "tok.parquet"
    assert write_parquet(tokenize(read_batches(spec), make_tokenizer(TEMPLATE), spec), out) == 3
    table = pq.read_table(out)
    assert table.schema.field("chosen_ids").type == S.TOKENS and table.num_rows == 3
    assert not (tmp_path / "tok.parquet.tmp").exists()


def test_write_parquet_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out.parquet"

    def failing():
        yield pa.record_batch({"prompt": ["a"]})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_parquet(failing(), out)
    assert list(tmp_path.iterdir()) == []

    write_parquet([pa.record_batch({"prompt": ["old"]})], out)
    with pytest.raises(RuntimeError):
        write_parquet(failing(), out)
    assert pq.read_table(out).column("prompt").to_pylist() == ["old"]  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_write_parquet_empty_stream_needs_a_schema(tmp_path):
    out = tmp_path / "e.parquet"
    with pytest.raises(ValueError, match="pass schema="):
        write_parquet([], out)
    assert not out.exists()
    assert write_parquet([], out, schema=pa.schema([("prompt", pa.string())])) == 0
    assert pq.read_table(out).column_names == ["prompt"]
