"""`rlhf-dist`: the command line. One table entry per subcommand; each handler imports its module lazily, so
`rlhf-dist config ...` answers without importing torch or Ray, and a bad config fails before anything heavy loads.
"""
import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_dist.config import ConfigError, check_imports, check_paths, dump_yaml, load_config

PROG = "rlhf-dist"


def _call(target: str, *args, **kwargs):
    """Call 'module:function', importing the module only now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.iterations=3 train.policy_lr=1e-5")


def run_job(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler that loads and checks the config, then calls `target(cfg)` (a driver's `run`)."""
    def handler(args: argparse.Namespace) -> int:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
        check_imports(cfg)
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
    p.add_argument("--check", action="store_true", help="also check that paths exist and reward.function imports")


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


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# Adding `sft`, `rm`, `dpo`, `pipeline`, `submit`, `bench` is one entry each.
COMMANDS = [
    Command("train", "RL fine-tuning (PPO/GAE, GRPO, RLOO, REINFORCE++)", _add_config_args,
            run_job("rlhf_dist.trainers.ppo:run")),
    Command("init-tiny", "build the tiny local model and tokenizer", _add_init_tiny_args, _init_tiny),
    Command("config", "print the resolved config as YAML", _add_config_cmd_args, _config),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Distributed RLHF on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage (code 2) or help (code 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.handler(args)
    except ConfigError as err:  # includes a missing config file; a user error, so no traceback
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
