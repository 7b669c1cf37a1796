"""The `swarm` command: status, plan, local swarms, training and inference jobs.

Each subcommand lives in its own module of this package with ``add_parser(subparsers)``, which
registers its flags and sets ``func(args) -> int`` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per subcommand family; each adds its own subparsers.
_SUBCOMMAND_MODULES = (
    "swarm.cli.status",
    "swarm.cli.local",
    "swarm.cli.plan",
    "swarm.cli.train",
    "swarm.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm", description="Use a swarm of volunteer GPUs: see it, plan, train, generate."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from swarm import log

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    log.configure(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
