"""The `swarm` command line: one module per command, errors as one red line and an exit code.

Exit codes: 0 ok, 1 runtime error (a server not found, a model that cannot load, ...), 2 usage error (an unknown
option, a missing argument, a bad value), 130 interrupted (Ctrl-C).

Importing this module is cheap (no torch, transformers or ZeroMQ): `--help`, `--version`, completions and usage
errors answer at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
import typer.core

from .. import __version__
from ..transport.errors import SwarmError
from . import api, bench, chat, completions, keygen, serve, status, tune
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, print_error


def _plain_flags(params: list[Any]) -> list[Any]:
    """Flags take no value, so their help shows none (typer's rich help would print `<bool>` beside them)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


GREEDY_OPTIONS = ("--adapters", "--lora-targets")  # take every value up to the next option: --adapters A B C


def _spread(args: list[str], names: set[str]) -> list[str]:
    """`--adapters A B C --x` as `--adapters A --adapters B --adapters C --x` (Click options take one value each)."""
    out: list[str] = []
    greedy: str | None = None
    for arg in args:
        if arg.startswith("-"):
            greedy = arg if arg in names else None
            if arg == "--":
                greedy = None
            out.append(arg)
        elif greedy is not None and out[-1] != greedy:
            out += [greedy, arg]
        else:
            out.append(arg)
    return out


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        names = {n for p in self.params for n in getattr(p, "opts", ()) if n in GREEDY_OPTIONS}
        return super().parse_args(ctx, _spread(list(args), names) if names else args)


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
                  help="Run and fine-tune large language models on machines pooled over a network.")


def _print_version(value: bool) -> None:
    if value:
        print(f"swarm {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", help="Print swarm's version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Run and fine-tune large language models on machines pooled over a network."""


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
app.command(context_settings=PEER_ARGS, cls=_Command)(command(serve.serve))
app.command(context_settings=PEER_ARGS, cls=_Command)(command(chat.chat))
app.command(context_settings=PEER_ARGS, cls=_Command)(command(status.status))
app.command(context_settings=PEER_ARGS, cls=_Command)(command(bench.bench))
app.command(context_settings=PEER_ARGS, cls=_Command)(command(tune.tune))
app.command(context_settings=PEER_ARGS, cls=_Command)(command(api.api))
app.command(cls=_Command)(command(keygen.keygen))
app.command(name="completions", cls=_Command)(command(completions.make_command(app)))


def run(args: list[str] | None = None) -> int:
    """Run the command line on `args` (default: sys.argv[1:]) and return its exit code.

    Click's usage errors (unknown option, missing argument, bad value) become one red `error:` line and exit code 2,
    like swarm's own; `swarm` alone prints the help and exits 0.
    """
    try:  # typer vendors click since 0.23; before, it used click itself
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions  # type: ignore[no-redef]

    try:
        code = app(args=args, prog_name="swarm", standalone_mode=False)
    except getattr(click_exceptions, "NoArgsIsHelpError", ()):  # the help is printed already
        return EXIT_OK
    except click_exceptions.UsageError as e:
        command_path = e.ctx.command_path if e.ctx is not None else "swarm"
        print_error(f"{e.format_message().rstrip('.')} (see {command_path} --help)")
        return EXIT_USAGE
    except click_exceptions.ClickException as e:
        print_error(e.format_message())
        return e.exit_code or EXIT_ERROR
    except (typer.Abort, KeyboardInterrupt):
        print_error("interrupted")
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
