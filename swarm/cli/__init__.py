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
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here for buffered output
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout was closed early (`swarm jobs | head`): that is the reader's choice, not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (tests' StringIO)
        pass


if __name__ == "__main__":
    sys.exit(main())
