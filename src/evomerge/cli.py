"""The `evomerge` command line: typer commands that parse, call the library and print.

Every user-caused error (an `EvomergeError`) becomes one sentence on stderr and exit code 2;
no traceback is shown for those.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging: merge, evaluate, evolve, export and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def report_error(error: EvomergeError) -> int:
    """Print a user error as one sentence on stderr; return its exit code (2)."""
    message = " ".join(str(error).split())
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return error.exit_code


# --- commands ---------------------------------------------------------------------------------
# One block per command; keep them thin (parse, call the library, print).


def run() -> None:
    """Console-script entry point: user errors exit 2 with one sentence, never a traceback."""
    try:
        app()
    except EvomergeError as error:
        sys.exit(report_error(error))


if __name__ == "__main__":  # pragma: no cover
    run()
