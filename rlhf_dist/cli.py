"""`rlhf-dist`: the command line. One table entry per subcommand; each handler imports its module lazily, so
`rlhf-dist config ...` answers without importing torch or Ray, and a bad config fails before anything heavy loads.
Building the parser imports the modules that add arguments (submit, orchestration.dry_run, doctor): they defer
their Ray and torch imports (`# deferred: cli`).

Every failure is one line on stderr. A bad config or bad data (ConfigError, DataError) exits 2; anything else exits 1
and names the file holding its full traceback (`<output_dir>/error.log` once the config has loaded); `--debug` also
prints the traceback.
"""

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_dist import supervise
from rlhf_dist.config import ConfigError, check_imports, check_paths, dump_yaml, load_config

PROG = "rlhf-dist"


def _call(target: str, *args, **kwargs):
    """Call 'module:function', importing the module only now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _lazy(target: str) -> Callable:
    """A handler or argument-adder that lives in another module, imported only when called."""
    return lambda *args: _call(target, *args)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.iterations=3 train.policy_lr=1e-5")


def run_job(target: str, resumable: bool = False) -> Callable[[argparse.Namespace], int]:
    """A handler that loads and checks the config, then calls `target(cfg)` (a driver's `run`). A resumable job
    with `checkpoint.max_auto_resume` > 0 runs its driver as a child that is resumed if killed (supervise.py)."""

    def handler(args: argparse.Namespace) -> int:
        cfg = load_config(args.config, args.overrides)
        args.output_dir = cfg.output_dir  # where main() writes error.log should the run fail
        check_paths(cfg)
        check_imports(cfg)
        if resumable and cfg.checkpoint.max_auto_resume and not supervise.is_driver():
            argv = ["--debug"] * args.debug + [args.command, args.config, *args.overrides]
            return supervise.supervise(argv, cfg.checkpoint.max_auto_resume, PROG)
        if cfg.ray.address is None:
            # A laptop run opens no port to the network: local Ray binds 127.0.0.1 with this set, and Ray reads it
            # once, when first imported (by the driver's modules, below). Not for a cluster: the driver's own address
            # must then be reachable.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        rc = _call(target, cfg)
        return rc if isinstance(rc, int) else 0

    return handler


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.check:
        check_paths(cfg)
        check_imports(cfg)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def _add_config_cmd_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="also check that paths exist, reward.function imports, reward.endpoint accepts a connection",
    )


def _init_tiny(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(None, f"{str(out)!r} is not empty; pass --overwrite or choose another DIR")
    _call("rlhf_dist.models.tiny:build_tiny", str(out), seed=args.seed)
    print(f"{PROG}: tiny model written to {out}")
    return 0


def _add_init_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="directory to write the tiny model and tokenizer to")
    p.add_argument("--seed", type=int, default=1, help="initialisation seed (default 1)")
    p.add_argument("--overwrite", action="store_true", help="write into DIR even if it is not empty")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--policy", required=True, metavar="DIR", help="the policy to evaluate (a Hugging Face model dir)")
    p.add_argument("--baseline", metavar="DIR", help="a policy to compare with (win rate under the judge)")


def _eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    args.output_dir = cfg.output_dir
    check_paths(cfg)
    check_imports(cfg)
    _call("rlhf_dist.trainers.evaluate:run", cfg, args.policy, args.baseline)
    return 0


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="configs/tiny_cpu.yaml", help="YAML (default configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--warmup", type=int, default=None, help="iterations not measured (default 5)")
    p.add_argument("--iters", type=int, default=None, help="measured iterations (default 50)")
    p.add_argument("--name", default=None, help="result name: benchmarks/results/NAME.json")


def _bench(args: argparse.Namespace) -> int:
    """benchmarks/throughput.py lives in the source checkout beside the package, not inside it."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not path.is_file():
        raise ConfigError(None, f"`{PROG} bench` runs {path}, which only a source checkout has")
    spec = importlib.util.spec_from_file_location("rlhf_dist_bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    given = {k: getattr(args, k) for k in ("warmup", "iters", "name") if getattr(args, k) is not None}
    module.bench(args.config, args.overrides, **given)
    return 0


def _add_label_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--summary", action="store_true", help="print the summary of the judgements so far and exit")


def _label(args: argparse.Namespace) -> int:
    """Serves the labelling page until Ctrl-C (its summary then), or with --summary prints the summary only."""
    cfg = load_config(args.config, args.overrides)
    args.output_dir = cfg.output_dir
    check_paths(cfg)
    return _call("rlhf_dist.label.app:summary" if args.summary else "rlhf_dist.label.app:serve", cfg)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# Adding `sft`, `rm`, `dpo`, `pipeline`, `submit`, `bench` is one entry each.
COMMANDS = [
    Command(
        "train",
        "RL fine-tuning (PPO/GAE, GRPO, RLOO, REINFORCE++)",
        _add_config_args,
        run_job("rlhf_dist.trainers.ppo:run", resumable=True),
    ),
    Command("sft", "supervised fine-tuning on demonstrations", _add_config_args, run_job("rlhf_dist.trainers.sft:run")),
    Command(
        "collect",
        "sample answer pairs from a policy and label them (simulated raters or an AI judge)",
        _add_config_args,
        run_job("rlhf_dist.trainers.collect:run"),
    ),
    Command(
        "rm",
        "reward-model training on preference pairs (Bradley-Terry)",
        _add_config_args,
        run_job("rlhf_dist.trainers.rm:run"),
    ),
    Command(
        "dpo",
        "direct preference optimisation on preference pairs",
        _add_config_args,
        run_job("rlhf_dist.trainers.dpo:run"),
    ),
    Command(
        "pipeline",
        "SFT -> collect -> reward model -> PPO and DPO -> comparison table",
        _add_config_args,
        run_job("rlhf_dist.trainers.pipeline:run"),
    ),
    Command(
        "label",
        "a web page where people judge answer pairs (judgements feed rm / dpo via label.sources); --summary",
        _add_label_args,
        _label,
    ),
    Command(
        "eval",
        "a policy (and a baseline) on held-out prompts: reward, gold, KL, length, distinct-n, win rate",
        _add_eval_args,
        _eval,
    ),
    Command(
        "serve-reward",
        "serve model.reward as a Ray Serve application (reward.serve) that jobs on the cluster share, until Ctrl-C",
        _add_config_args,
        run_job("rlhf_dist.orchestration.reward_serve:serve_reward"),
    ),
    Command(
        "submit",
        "run a config on a Ray cluster (Ray job submission); --status/--logs/--stop JOB",
        _lazy("rlhf_dist.submit:add_submit_args"),
        _lazy("rlhf_dist.submit:run_submit"),
    ),
    Command(
        "plan",
        "dry-run: print which role goes on which node and GPUs, start nothing",
        _lazy("rlhf_dist.orchestration.dry_run:add_args"),
        _lazy("rlhf_dist.orchestration.dry_run:run"),
    ),
    Command(
        "bench",
        "throughput benchmark: samples/s, tokens/s, seconds per phase, memory, overhead",
        _add_bench_args,
        _bench,
    ),
    Command(
        "doctor",
        "installed versions, devices, and whether they are the tested set (constraints/*.txt)",
        _lazy("rlhf_dist.doctor:add_args"),
        _lazy("rlhf_dist.doctor:run"),
    ),
    Command("init-tiny", "build the tiny local model and tokenizer", _add_init_tiny_args, _init_tiny),
    Command("config", "print the resolved config as YAML", _add_config_cmd_args, _config),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Distributed RLHF on Ray.")
    debug_help = "on an error, also print the full traceback to stderr"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.set_defaults(output_dir=None)  # set by a handler once it has loaded the config
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        # SUPPRESS: without --debug here, the subcommand leaves the global flag as it was
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        p.set_defaults(handler=cmd.handler)
    return parser


def one_line(exc: BaseException) -> str:
    """The first line of the message; a Python or library error also gets its type (`KeyError: 'x'`), since ours
    (ConfigError, DataError, RoleGroupError) are written to stand alone and theirs often are not."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    name = type(exc).__name__
    if not text:
        return name
    return text if type(exc).__module__.startswith("rlhf_dist") else f"{name}: {text}"


def is_user_error(exc: BaseException) -> bool:
    """A bad config or bad input data: the message is the whole story, so exit 2 and no traceback file."""
    # DataError without importing its module (and pyarrow): it can only have been raised if the module is loaded.
    readers = sys.modules.get("rlhf_dist.data.readers")
    return isinstance(exc, ConfigError) or (readers is not None and isinstance(exc, readers.DataError))


def write_traceback(exc: BaseException, output_dir: str | None, argv: list[str]) -> Path | None:
    """Append the full traceback (chained causes included) to `<output_dir>/error.log`, or to a new file in the
    system temp dir when there is no output dir or it cannot be written. Returns the file, or None if none could be."""
    header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {PROG} {' '.join(argv)}\n"
    text = header + "".join(traceback.format_exception(exc)) + "\n"
    if output_dir is not None:
        path = Path(output_dir) / "error.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix=f"{PROG}-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage (code 2) or help (code 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line's last word: one line, the rest to a file
        if args.debug:
            traceback.print_exception(err, file=sys.stderr)
        if is_user_error(err):  # includes a missing config file
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
            return 2
        log = write_traceback(err, args.output_dir, argv)
        where = f"full traceback: {log}" if log else "no traceback file could be written; rerun with --debug"
        print(f"{PROG}: error: {one_line(err)} ({where})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
