"""logging.trackers: rows written through MetricsLog are read back from each tracker with that tracker's own reader
(TensorBoard's EventAccumulator, wandb's record schema over the offline run file, MLflow's client on the file store);
the config, run.json and the plot go along. No Ray: MetricsLog and the trackers, as a driver uses them."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.metrics import MetricsLog, plot
from rlhf_dist.trackers import BACKENDS, RunInfo, TrackerError, Trackers, open_log

ROWS = [
    {"iteration": i, "reward_mean": 0.25 * i - 0.5, "kl": 0.01 * i * i, "time/train": 1.0 + i, "time/train/x": 0.5}
    for i in range(3)
]
ROWS[0]["mode"] = "sync"  # text: not a scalar
RUN_ID = "0123456789abcdef0123456789abcdef"


def run_info(out: Path, resume: bool = False, **extra) -> RunInfo:
    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={out}"])
    manifest = out / "run.json"
    if not manifest.exists():
        out.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"run_id": RUN_ID, "command": "train"}))
    from rlhf_dist.config import config_to_dict, dump_yaml

    return RunInfo(out, "train", "tiny-train", RUN_ID, resume, config_to_dict(cfg), dump_yaml(cfg), manifest, **extra)


def write(out: Path, tracker: str, rows=ROWS, resume: bool = False) -> Path:
    """The rows through MetricsLog with one tracker, and the plot as an artifact, as the PPO driver does."""
    with MetricsLog(
        out / "metrics.jsonl", trackers=Trackers({tracker: BACKENDS[tracker]}, run_info(out, resume))
    ) as log:
        for row in rows:
            log.log(row)
        png = plot(log.rows, out / "reward_kl.png", ("reward_mean", "kl"))
        log.artifact(png)
    return png


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(tmp_path, "tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "train"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for key in ("reward_mean", "kl", "time/train", "time/train/x"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in ROWS])
    assert "mode" not in acc.Tags()["scalars"]  # text values are not scalars
    image = acc.Images("reward_kl")[0]
    assert image.step == 2 and image.width > 100 and image.height > 100
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert "iterations: 80" in texts["config/text_summary"] and RUN_ID in texts["run.json/text_summary"]


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks of
    records: crc32, length, type FULL/FIRST/MIDDLE/LAST, data), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    i, block, pending, out = 7, 32768, b"", []
    while i + 7 <= len(data):
        if block - i % block < 7:  # a block's tail too short for a header is padding
            i += block - i % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[i : i + 7])
        chunk, i = data[i + 7 : i + 7 + n], i + 7 + n
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "corrupt record"
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_dir_holds_the_history_config_and_files(tmp_path):
    write(tmp_path, "wandb")
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(next(run.glob("run-*.wandb")))
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert steps == [0, 1, 2]
    for key in ("reward_mean", "kl", "time/train/x"):
        assert [h[key] for h in history] == pytest.approx([r[key] for r in ROWS])
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == f"{RUN_ID}-train" and start.project == "rlhf_dist" and start.display_name == "tiny-train"
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in start.config.update}
    assert config["seed"] == 1 and config["train"]["iterations"] == 80
    files = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "reward_kl.png" in files
    for name in ("config.yaml", "run.json", "reward_kl.png"):
        assert (run / "files" / name).stat().st_size > 0
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf_dist").experiment_id])
    return client, run


def test_mlflow_file_store_read_back_through_its_client(tmp_path):
    write(tmp_path, "mlflow")
    client, run = mlflow_client(tmp_path)
    for key in ("reward_mean", "kl", "time/train", "time/train/x"):  # a file store keeps a/b and a/b/c as a.b, a.b.c
        history = client.get_metric_history(run.info.run_id, key.replace("/", "."))
        assert [m.step for m in history] == [0, 1, 2]
        assert [m.value for m in history] == pytest.approx([r[key] for r in ROWS])
    assert run.data.params["seed"] == "1" and run.data.params["train.iterations"] == "80"
    assert run.data.tags["rlhf_dist.run_id"] == RUN_ID and run.info.run_name == "tiny-train"
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "run.json", "reward_kl.png"}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    write(tmp_path, "mlflow", rows=ROWS[:2])
    write(tmp_path, "mlflow", rows=ROWS[2:], resume=True)
    client, run = mlflow_client(tmp_path)  # one run, not two
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kl")] == [0, 1, 2]
    assert run.info.status == "FINISHED"


def test_a_failing_tracker_stops_the_run_naming_it(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the event dir should go")
    log = MetricsLog(
        tmp_path / "metrics.jsonl", trackers=Trackers({"tensorboard": BACKENDS["tensorboard"]}, run_info(tmp_path))
    )
    with pytest.raises(TrackerError, match=r"^logging.trackers: tensorboard failed in start \(\w+Error: "):
        log.log(ROWS[0])  # raises here or, if the tracker thread has not failed yet, at close
        log.close()
    assert len(log.rows) == 1 and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # jsonl has every row


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_trackers_run_at_the_lowest_cpu_priority(tmp_path):
    """The trackers' thread, and what it starts, take the CPU the actors (nice 15) leave idle: nice 19."""
    import os
    import threading

    seen = {}

    class Probe:
        def __init__(self, info):
            seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def log(self, scalars, step): ...

        def close(self, failed): ...

    with MetricsLog(tmp_path / "metrics.jsonl", trackers=Trackers({"probe": Probe}, run_info(tmp_path))) as log:
        log.log(ROWS[1])
    assert seen["thread"] == 19 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19, seen


def test_the_default_is_jsonl_alone_and_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    from rlhf_dist import run_dir

    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    assert cfg.logging.trackers == ["jsonl"]
    with run_dir.claim(cfg, "train"):
        assert open_log(cfg, "train", tmp_path / "metrics.jsonl").trackers is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}", "logging.trackers=[jsonl,wandb]"])
    with pytest.raises(ConfigError, match=r"pip install 'rlhf_dist\[trackers\]'") as err:
        open_log(cfg, "train", tmp_path / "metrics.jsonl")
    assert str(err.value).startswith("logging.trackers: wandb needs the 'wandb' package") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("logging.trackers=[jsonl,tensorbord]", "logging.trackers[1]", "did you mean tensorboard?"),
        ("logging.trackers=[wandb,wandb]", "logging.trackers", "wandb listed twice"),
        ("logging.mlflow_tracking_uri=sqlite:///x.db", "logging.mlflow_tracking_uri", "has no mlflow"),
    ],
)
def test_bad_tracker_settings_are_one_line(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny_cpu.yaml", [override])
    assert str(err.value).startswith(key + ":") and words in str(err.value)


@pytest.mark.slow
def test_a_ppo_job_on_conversational_prompts_reports_to_every_tracker(tiny_cfg, local_ray, tmp_path):
    """Two PPO iterations on real Ray actors with every tracker on: each holds the rows of metrics.jsonl, and the
    reward function (1 for a prompt rendered by the chat template) saw the policy's templated prompts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_chat import CONVERSATIONS

    from rlhf_dist.trainers.ppo import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": CONVERSATIONS[i % 3]}) + "\n" for i in range(8)))
    cfg = tiny_cfg(
        "train.iterations=2",
        "train.prompts_per_iteration=4",
        "generation.max_new_tokens=4",
        "ray.num_cpus=null",
        # four actors, no critic, no DeepSpeed: a short real job
        "train.engine=torch",
        "algo.estimator=reinforce_pp",
        "roles.critic.num_actors=0",
        "data.task=prompts",
        f"data.prompts={prompts}",
        "reward.function=tests.test_chat:templated_prompt_reward",
        "logging.trackers=[jsonl,tensorboard,wandb,mlflow]",
    )
    summary = run(cfg)
    out = Path(cfg.output_dir)
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    assert [r["reward_mean"] for r in rows] == [1.0, 1.0]  # every prompt the reward saw was the rendered one

    acc = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("kl")] == [(r["iteration"], pytest.approx(r["kl"])) for r in rows]
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    history = [r.history for r in wandb_records(next(wandb_run.glob("*.wandb"))) if r.HasField("history")]
    kl = [json.loads(i.value_json) for h in history for i in h.item if (i.key or "/".join(i.nested_key)) == "kl"]
    assert kl == pytest.approx([r["kl"] for r in rows])
    client, mlrun = mlflow_client(out)
    assert [m.value for m in client.get_metric_history(mlrun.info.run_id, "kl")] == pytest.approx(
        [r["kl"] for r in rows]
    )
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} == {"config.yaml", "run.json", "reward_kl.png"}
    assert (wandb_run / "files" / "reward_kl.png").exists() and acc.Tags()["images"] == ["reward_kl"]
