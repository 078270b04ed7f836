"""The `swarm` command line: one module per command, errors as one red line and an exit code.

Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from ..transport.errors import SwarmError
from . import bench, chat, completions, serve, status, tune
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, print_error

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run and fine-tune large language models on machines pooled over a network.")


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn swarm's errors into one red line and an exit code (the only place that does)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UsageError as e:
            print_error(str(e))
            raise typer.Exit(EXIT_USAGE) from None
        except SwarmError as e:
            print_error(str(e))
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


PEER_ARGS = {"allow_extra_args": True}
app.command(context_settings=PEER_ARGS)(command(serve.serve))
app.command(context_settings=PEER_ARGS)(command(chat.chat))
app.command(context_settings=PEER_ARGS)(command(status.status))
app.command(context_settings=PEER_ARGS)(command(bench.bench))
app.command(context_settings=PEER_ARGS)(command(tune.tune))
app.command(name="completions")(command(completions.make_command(app)))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="swarm")
