"""What every pathmil command line shares: the top-level parser, logging, errors, options made from
config dataclasses, and tables.

`wsi`, `mil` (and the packages after them) build their subcommands on `command_parser`, add the
options of their config dataclasses with `add_config_options` (so each default is written once, in
the dataclass), and end in `run_command`, which turns a `PathmilError` into one line on stderr and
exit status 2 (the traceback only with -v).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping


_VERBOSE_HELP = "more log lines; tracebacks of errors"
_QUIET_HELP = "warnings and errors only, no progress bars"


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser: -v / -q are accepted after the subcommand too (`mil train ... -q`).
    They land in their own dests, so a subcommand never resets what was given before it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=argparse.SUPPRESS,
                          help=_VERBOSE_HELP)
        self.add_argument("-q", "--quiet", dest="sub_quiet", action="store_true", default=argparse.SUPPRESS,
                          help=_QUIET_HELP)


class _Command(argparse.ArgumentParser):
    """The top-level parser: folds the subcommand's -v / -q into `verbose` / `quiet`."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, rest = super().parse_known_args(args, namespace)
        sub_verbose, sub_quiet = vars(ns).pop("sub_verbose", 0), vars(ns).pop("sub_quiet", False)
        ns.verbose = getattr(ns, "verbose", 0) + sub_verbose
        ns.quiet = bool(getattr(ns, "quiet", False) or sub_quiet)
        return ns, rest


def command_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser with -v / -q, and its (required) subcommands, which accept -v / -q as well
    (before or after the subcommand: `mil -q train ...` and `mil train ... -q` are the same)."""
    p = _Command(prog=prog, description=description)
    p.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    return p, p.add_subparsers(dest="command", required=True, parser_class=_Subcommand)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set up logging, and run the chosen subcommand's `func` with log lines kept off progress
    bars. A `PathmilError` (the user's input, files or settings) ends as `<prog>: error: <message>`
    on stderr and exit status 2; its traceback is printed only with -v."""
    from .errors import PathmilError

    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            return args.func(args)
    except BrokenPipeError:  # `wsi info ... | head`: the reader left; no traceback for that
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PathmilError as e:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2


def format_table(rows: list[tuple | list]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def registry_help(**fill: Callable[[], str]) -> type[argparse.HelpFormatter]:
    """A HelpFormatter that replaces "{name}" in help texts with `fill[name]()` only when help is
    shown, so building a parser never imports a registry (and torch with it): `wsi tile` and
    `wsi info` start in a fraction of a second."""

    class RegistryHelp(argparse.HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str | None:
            text = super()._get_help_string(action)
            for name, make in fill.items():
                if text and "{%s}" % name in text:
                    text = text.replace("{%s}" % name, make())
            return text

    return RegistryHelp


# ---- options from config dataclasses ---------------------------------------------------------------
def checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` whose ValueError message is shown as is (argparse would hide it)."""
    def parse(s: str) -> Any:
        try:
            return convert(s)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def positive_float(s: str) -> float:
    """An argparse type: a number > 0."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return v


_SCALARS = (int, float, str, Path)


def _plain_type(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                       only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (), prefix: str = "",
                       names: Mapping[str, str] | None = None, help: Mapping[str, str] | None = None,
                       types: Mapping[str, Callable[[str], Any]] | None = None,
                       choices: Mapping[str, list] | None = None) -> list[str]:
    """Add one option per field of the dataclass `cls`; defaults come from the dataclass, so each is
    written once. Returns the field names added; `config_from_args` reads them back.

    - option names: `--<prefix><field-with-dashes>`, or `names[field]` (e.g. {"target_mpp": "--mpp"});
    - help: `help[field]`, else the field's `metadata["help"]`; "(default: X)" is appended;
    - a bool field defaulting to False is a `--flag` (store_true); one defaulting to True is a
      `--no-<field>` flag (or `names[field]`) that turns it off, with `metadata["off_help"]` as help;
    - `types[field]` parses the string (its ValueError message is shown), `choices[field]` limits it;
    - fields of other types (dicts, nested dataclasses) are left out unless `types` gives a parser;
      naming one in `only` is then an error.
    """
    names, help, types, choices = dict(names or {}), dict(help or {}), dict(types or {}), dict(choices or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in (*(only or ()), *skip, *names, *help, *types, *choices) if k not in fields]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}")
    added = []
    for name in (only or fields):
        f = fields[name]
        if name in skip or not f.init:
            continue
        hint, optional = _plain_type(hints[name])
        default = _default(f)
        dest = (prefix + name).replace("-", "_")
        text = help.get(name) or f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": dest}
        if hint is bool and name not in types:
            on = default is True
            flag = names.get(name) or f"--{'no-' if on else ''}{prefix}{name.replace('_', '-')}"
            text = help.get(name) or (f.metadata.get("off_help") if on else None) or text
            parser.add_argument(flag, action="store_false" if on else "store_true", default=bool(default),
                                help=text, **kw)
            added.append(name)
            continue
        convert = types.get(name)
        if convert is None:
            origin = typing.get_origin(hint)
            if origin is typing.Literal:
                kw["choices"] = list(typing.get_args(hint))
                convert = type(kw["choices"][0])
            elif hint in _SCALARS:
                convert = hint
            elif only is not None and name in only:
                raise ValueError(f"{cls.__name__}.{name} ({hint}) has no command-line form; pass types={{...}}")
            else:
                continue
        elif convert not in _SCALARS and convert is not positive_float:
            convert = checked(convert)
        if name in choices:
            kw["choices"] = list(choices[name])
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
            if default is not None and "default" not in text:
                text = f"{text} (default: {default})" if text else f"default: {default}"
        flag = names.get(name) or f"--{prefix}{name.replace('_', '-')}"
        parser.add_argument(flag, type=convert, help=text, **kw)
        added.append(name)
    return added


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> Any:
    """An instance of `cls` from the options `add_config_options` added (same `prefix`); fields without
    an option keep their dataclass default, `overrides` win."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if f.init and hasattr(args, dest):
            kwargs[f.name] = getattr(args, dest)
    kwargs.update(overrides)
    return cls(**kwargs)
