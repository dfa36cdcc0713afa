"""Every bad input is one line (issue 11): PPO prompt files go through the validated readers, text that is not UTF-8
is named by file and row (and line, for JSON Lines), and the command line prints one line for any failure, with the
traceback in `<output_dir>/error.log`. No Ray: a bad prompt file fails in `trainers.ppo.prepare`, before any actor.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_datasets import write_hf, write_jsonl, write_pq

from rlhf_dist import cli, supervise
from rlhf_dist.config import load_config
from rlhf_dist.data.datasets import DataError, DatasetSpec, load_table
from rlhf_dist.data.prompts import PromptSampler, read_prompt_texts
from rlhf_dist.data.synthetic import make_prompts

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml")
PROMPTS = [f"prompt number {i}" for i in range(5)]


def prompts_cfg(path, *overrides):
    return load_config(TINY, ["data.task=prompts", f"data.prompts={path}", *overrides])


def prompt_error(path, *overrides) -> str:
    with pytest.raises(DataError) as info:
        read_prompt_texts(prompts_cfg(path, *overrides))
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.prompts: ")
    assert str(path) in message
    return message


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def latin1_jsonl(path: Path, n: int, bad_row: int, blank_lines: int = 0) -> Path:
    """`n` rows of JSON Lines, row `bad_row` holding Latin-1 bytes, after `blank_lines` blank lines."""
    rows = [json.dumps({"prompt": f"prompt {i}", "response": f"answer {i}"}).encode() for i in range(n)]
    rows[bad_row] = '{"prompt": "caf\u00e9 au lait", "response": "ok"}'.encode("latin-1")
    return write_lines(path, [b""] * blank_lines + rows)


# --- PPO prompts through the validated readers ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk"])
def test_prompt_files_read_every_row_in_order(tmp_path, fmt):
    rows = {"question": PROMPTS, "other": ["x"] * 5}
    path = {
        "jsonl": lambda: write_jsonl(tmp_path / "p.jsonl", rows),
        "parquet": lambda: write_pq(tmp_path / "p.parquet", rows),
        "save_to_disk": lambda: write_hf(tmp_path / "saved", rows),
    }[fmt]()
    assert read_prompt_texts(prompts_cfg(path, "data.prompt_column=question")) == PROMPTS


def test_synthetic_prompts_are_unchanged():
    cfg = load_config(TINY, ["data.num_prompts=7", "seed=3"])
    assert read_prompt_texts(cfg) == make_prompts(7, seed=3)


def test_malformed_jsonl_line_names_file_row_and_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [b'{"prompt": "a"}', b"", b'{"prompt": "b"', b'{"prompt": "c"}'])
    message = prompt_error(path)
    assert "row 1 (line 3): JSON parse error" in message and "fix that line" in message


def test_non_utf8_prompt_names_file_row_line_and_fix(tmp_path):
    path = latin1_jsonl(tmp_path / "p.jsonl", n=4, bad_row=2, blank_lines=1)
    message = prompt_error(path)
    assert "row 2 (line 4), column 'prompt': bytes that are not UTF-8; re-encode the file as UTF-8" in message


def test_int_prompt_column_in_parquet_names_the_option(tmp_path):
    path = write_pq(tmp_path / "p.parquet", {"text": [1, 2, 3]})
    message = prompt_error(path, "data.prompt_column=text")
    assert "row 0, column 'text' (the prompt column): type int64, expected text" in message
    assert "point data.prompt_column at a text column" in message


def test_missing_prompt_column_names_data_prompt_column(tmp_path):
    path = write_hf(tmp_path / "saved", {"question": PROMPTS})
    message = prompt_error(path)
    assert "column 'prompt': no such column; the file has columns 'question'; set data.prompt_column" in message


def test_empty_prompt_and_corrupt_parquet_are_one_line(tmp_path):
    assert "row 1, column 'prompt': empty text" in prompt_error(
        write_jsonl(tmp_path / "p.jsonl", {"prompt": ["a", " "]})
    )
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    prompt_error(corrupt)  # pyarrow's message names no file; read_prompt_texts adds it
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert "no prompts" in prompt_error(empty)


def test_too_few_prompts_names_data_prompts_and_the_fix(tmp_path):
    table = pa.table({"prompt_ids": [[1, 2]]})
    with pytest.raises(DataError) as info:
        PromptSampler(table, per_iteration=64, samples_per_prompt=1, seed=0)
    message = str(info.value)
    assert "data.prompts: 1 prompt, fewer than train.prompts_per_iteration=64" in message
    assert "lower train.prompts_per_iteration" in message


# --- text that is not UTF-8 in SFT / RM / DPO files ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "bad_row"), [(3, 0), (3000, 2500)])  # first line; far past the first read buffer
def test_non_utf8_demonstrations_jsonl(tmp_path, n, bad_row):
    path = latin1_jsonl(tmp_path / "sft.jsonl", n=n, bad_row=bad_row)
    with pytest.raises(DataError) as info:
        load_table(DatasetSpec(path, "demonstrations", json_block_bytes=16 << 10))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"row {bad_row} (line {bad_row + 1}), column 'prompt': bytes that are not UTF-8" in message
    assert "re-encode the file as UTF-8" in message


def test_non_utf8_preferences_parquet(tmp_path):
    binary = pa.array([b"good", b"caf\xe9", b"fine"], pa.binary())
    table = pa.table({"prompt": ["a", "b", "c"], "chosen": binary.view(pa.string()), "rejected": ["x", "y", "z"]})
    path = tmp_path / "prefs.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as info:
        load_table(DatasetSpec(path, "preferences"))
    assert f"{path}: row 1, column 'chosen': bytes that are not UTF-8" in str(info.value)


# --- the command line: one line, traceback to a file ---------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err.splitlines()


def train_args(tiny_model, tmp_path, *overrides):
    return [
        "train",
        TINY,
        f"model.policy={tiny_model}",
        f"output_dir={tmp_path / 'run'}",
        "logging.progress_bar=false",
        "data.task=prompts",
        *overrides,
    ]


@pytest.fixture
def no_ray(monkeypatch):
    """The train command must fail in prepare(), before any Ray session starts."""
    import rlhf_dist.trainers.ppo as ppo

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray session started for a run with bad input")

    monkeypatch.setattr(ppo, "ray_session", refuse)
    monkeypatch.setenv(supervise.DRIVER_ENV, "1")  # the driver in this process, as the supervisor starts it


@pytest.mark.parametrize("case", ["malformed", "not_utf8", "one_row"])
def test_train_with_a_bad_prompt_file_is_one_line_and_exit_2(tiny_model, tmp_path, capsys, no_ray, case):
    path = {
        "malformed": lambda: write_lines(tmp_path / "p.jsonl", [b'{"prompt": "a"}', b'{"prompt": b}']),
        "not_utf8": lambda: latin1_jsonl(tmp_path / "p.jsonl", n=3, bad_row=1),
        "one_row": lambda: write_jsonl(tmp_path / "p.jsonl", {"prompt": ["just one"]}),
    }[case]()
    rc, err = run_cli(capsys, *train_args(tiny_model, tmp_path, f"data.prompts={path}"))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("rlhf-dist: error: data.prompts: ")
    expected = {
        "malformed": f"{path}: row 1 (line 2): JSON parse error",
        "not_utf8": f"{path}: row 1 (line 2), column 'prompt': bytes that are not UTF-8",
        "one_row": "1 prompt, fewer than train.prompts_per_iteration=64",
    }[case]
    assert expected in err[0]
    assert not (tmp_path / "run" / "error.log").exists()  # a user error: the line is the whole story


def test_supervised_train_passes_on_the_drivers_one_line_and_exit_code(tiny_model, tmp_path, capfd, monkeypatch):
    """Without the driver's mark, `train` supervises a child driver (supervise.py): the user sees the same."""
    monkeypatch.delenv(supervise.DRIVER_ENV, raising=False)
    path = write_lines(tmp_path / "p.jsonl", [b'{"prompt": "a"}', b'{"prompt": b}'])
    rc = cli.main(train_args(tiny_model, tmp_path, f"data.prompts={path}"))
    err = capfd.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{path}: row 1 (line 2): JSON parse error" in err[0]


def explode(cfg):
    try:
        {}["inner cause"]
    except KeyError as e:
        raise RuntimeError("driver failed\nsecond line of detail") from e


@pytest.fixture
def boom(monkeypatch):
    """A `boom` subcommand that loads the config like `train` and then raises."""
    command = cli.Command("boom", "raises", cli._add_config_args, cli.run_job(f"{__name__}:explode"))
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, command])


def test_runtime_error_is_one_line_exit_1_and_error_log_holds_the_traceback(tmp_path, capsys, boom):
    log = tmp_path / "run" / "error.log"
    args = ["boom", TINY, f"output_dir={tmp_path / 'run'}"]
    for _ in range(2):
        rc, err = run_cli(capsys, *args)
        assert rc == 1
        assert err == [f"rlhf-dist: error: RuntimeError: driver failed (full traceback: {log})"]
    text = log.read_text()
    assert text.count("=== ") == 2 and "rlhf-dist boom" in text  # appended, with a header each time
    assert "KeyError: 'inner cause'" in text and "direct cause of the following exception" in text
    assert "second line of detail" in text and "in explode" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(tmp_path, capsys, boom, where):
    args = ["boom", TINY, f"output_dir={tmp_path / 'run'}"]
    rc, err = run_cli(capsys, *(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert rc == 1
    assert err[0] == "Traceback (most recent call last):" and "KeyError: 'inner cause'" in err
    assert err[-1].startswith("rlhf-dist: error: RuntimeError: driver failed (full traceback: ")


def test_unwritable_output_dir_falls_back_to_the_temp_dir(tmp_path, capsys, boom, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc, err = run_cli(capsys, "boom", TINY, f"output_dir={tmp_path / 'a_file' / 'run'}")
    assert rc == 1 and len(err) == 1
    (logged,) = tmp_path.glob("rlhf-dist-error-*.log")
    assert err[0].endswith(f"(full traceback: {logged})")
    assert "KeyError: 'inner cause'" in logged.read_text()


def test_one_line():
    assert cli.one_line(DataError("p.jsonl: row 3: bad")) == "p.jsonl: row 3: bad"
    assert cli.one_line(ValueError("\nfirst\nsecond")) == "ValueError: first"
    assert cli.one_line(KeyError("k")) == "KeyError: 'k'"
    assert cli.one_line(RuntimeError()) == "RuntimeError"


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("stop", "interrupted", lambda p: None, interrupt)])
    assert run_cli(capsys, "stop") == (130, ["rlhf-dist: interrupted"])
