"""Global command-line options (``--config``, ``-v``, ``--json``) accepted before or after
any subcommand.

``ktrdr-run ops list --config X`` and ``ktrdr-run --config X ops list`` mean the same. The
top-level parser holds the options' real defaults; every subcommand parser, at every
nesting level and whoever adds it, gets them as ``parents`` with ``default=SUPPRESS``, so
a default never overwrites a value given earlier. ``--config`` given at several levels:
the last one wins. ``-v`` counts add up over all levels (``-v ops list -v`` is ``-vv``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def global_options(defaults: bool) -> argparse.ArgumentParser:
    """``--config`` and ``-v``: with their defaults (top level) or without (subcommands)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument(
        "--config",
        type=Path,
        default=None if defaults else argparse.SUPPRESS,
        help="config file (default: $KTRDR_RUN_CONFIG or ./ktrdr-run.toml)",
    )
    opts.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if defaults else argparse.SUPPRESS,
        help="more logging (-vv: debug); counts add up before and after the subcommand",
    )
    opts.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="machine-readable output: JSON on stdout",
    )
    return opts


_SUB_GLOBALS = global_options(defaults=False)


class SubcommandsAction(argparse._SubParsersAction):
    """Gives every subcommand the global options, and adds up ``-v`` over the levels."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [_SUB_GLOBALS, *kwargs.get("parents", ())]
        return super().add_parser(name, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        # The subcommand parses into a fresh namespace whose values then replace ours:
        # keep the -v count given so far and add the subcommand's to it.
        before = vars(namespace).pop("verbose", None)
        super().__call__(parser, namespace, values, option_string)
        after = getattr(namespace, "verbose", None)
        if before is not None or after is not None:
            namespace.verbose = (before or 0) + (after or 0)


class Parser(argparse.ArgumentParser):
    """An argument parser whose subcommands take the global options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Nested subcommand parsers are of this class too (argparse's default), so
        # every level's add_subparsers() uses SubcommandsAction.
        self.register("action", "parsers", SubcommandsAction)


def global_options_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A top-level parser whose subcommands (at every level) all take the global options."""
    return Parser(parents=[global_options(defaults=True)], **kwargs)
