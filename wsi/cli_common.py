"""What every pathmil command line shares: the top-level parser, logging, tables, and running a command.

`wsi`, `mil` (and the packages after them) build their subcommands on `command_parser` and end in
`run_command`, so -v/-q, log format, progress-bar-safe logging and table layout are the same everywhere.
"""
from __future__ import annotations

import argparse
import logging
import sys


def command_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser with -v / -q, and its (required) subcommands."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    return p, p.add_subparsers(dest="command", required=True)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set up logging, and run the chosen subcommand's `func` with log lines kept off progress bars."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        return args.func(args)


def format_table(rows: list[tuple | list]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
