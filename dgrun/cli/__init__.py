"""The `dgrun` command line (docs/recipes.md, "Commands").

Exit codes: 0 ok · 1 a run failed · 2 bad input (recipe, flags, paths) · 130 interrupted (SIGINT) ·
143 terminated (SIGTERM).
torch is never imported by `--help`, `check`, `steps`, `plugins` or `schema`.
"""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from dgrun import __version__
from dgrun.cli import experiments, inspection, run, serve, tune  # noqa: F401 - importing registers commands
from dgrun.cli.common import app, out

COMMANDS = ("run", "check", "steps", "plugins", "schema", "bench", "reproduce", "serve", "tune")

__all__ = ["COMMANDS", "app", "main"]


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"dgrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """dgrun: diffusion-inference optimization as version-controlled, reproducible experiments."""


def _terminated(signum: int, frame: object) -> None:
    from dgrun.errors import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `dgrun RECIPE ...` is shorthand for `dgrun run RECIPE ...`."""
    # Ctrl-C must stop a run even when the launcher (a script's `&`, some CI runners) ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM (a scheduler, `kill`, a container stop) ends a run like Ctrl-C: recorded, images kept.
    signal.signal(signal.SIGTERM, _terminated)
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and args and not args[0].startswith("--version"):
        args.insert(0, "run")
    app(args=args, prog_name="dgrun")
