"""What the stage modules' command lines share (``python -m saeflow.<stage> ...``).

Each stage module declares its own arguments, with help texts about its own inputs, and checks
them in its ``parse_args``; these helpers hold the lines that were the same in every module: the
parser's header, the ``--threads`` option and the ``main`` tail that applies it and runs the
command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

THREADS_HELP = "torch threads (0: torch default)"

Command = Callable[[argparse.Namespace], Any]


def stage_parser(module: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``; ``description`` (the module docstring, usually) is
    shown in ``--help`` as written, line breaks kept.

    ``module`` is spelled out by the caller: under ``python -m`` the module's ``__name__`` is
    ``__main__``.
    """
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for this process (0 keeps torch's default)."""
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)


def run_command(args: argparse.Namespace, commands: Command | Mapping[str, Command]) -> Any:
    """Apply ``--threads`` (where the command has it), then run ``commands(args)``, or, for a
    parser with sub-commands, ``commands[args.command](args)``; return what it returns."""
    threads = getattr(args, "threads", 0)
    if threads:
        import torch  # here, not at the top: the figure stages do not need torch

        torch.set_num_threads(threads)
    command = commands[args.command] if isinstance(commands, Mapping) else commands
    return command(args)
