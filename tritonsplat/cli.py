"""`tritonsplat`: one command family for the whole project.

    tritonsplat track ...   fit / eval / export / render / view / demo / table (alias: tritonsplat-track)
    tritonsplat data ...    info / convert / init-points / synth              (alias: data-tools)
    tritonsplat bench ...   render / step / stages / gpu-check / ...          (alias: python -m bench)
    tritonsplat aot ...     ahead-of-time compile report of the Triton kernels (alias: python -m tritonsplat.aot)

Subcommands are imported only when used, so `tritonsplat --help` is instant and a missing optional
part (`bench` lives in the source checkout, not in the wheel) fails with a one-line message. Every
subcommand shares the error handling of `user_errors`: a user mistake prints one line and exits
with a documented code, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import importlib
import sys

import click

# Exit codes shared by every command of the family (the tracking ones are listed in tracking/cli.py).
EXIT_BAD_INPUT = 1
EXIT_DISK_FULL = 4
EXIT_INTERRUPTED = 130


class ExitError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = code


def user_errors(fn=None, *, on_interrupt: str = "interrupted", disk_full: str = "disk full"):
    """Decorator: turn expected failures into one-line messages and exit codes.

    Exceptions with an integer `exit_code` attribute (tracking.TrackingError, ...) keep their code;
    ValueError (argument checks) and missing / unreadable files exit 1; a full disk exits 4 with
    `disk_full` appended; Ctrl-C prints `on_interrupt` and exits 130.
    """
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except click.ClickException:
                raise
            except KeyboardInterrupt:
                click.echo(f"\n{on_interrupt}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ExitError(f"disk full while writing {exc.filename or ''}: {disk_full}",
                                    EXIT_DISK_FULL) from None
                if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
                    name = exc.filename or ""
                    raise ExitError(f"{name}: {exc.strerror}" if name else str(exc)) from None
                raise
            except ValueError as exc:
                raise ExitError(str(exc)) from None
            except Exception as exc:
                code = getattr(type(exc), "exit_code", None)
                if isinstance(code, int):
                    raise ExitError(str(exc), code) from None
                raise
        return wrapper

    return decorate(fn) if fn is not None else decorate


# name -> (module, attribute, one-line help)
SUBCOMMANDS = {
    "track": ("tracking.cli", "main", "Fit, evaluate, export, render and view Dynamic 3D Gaussians runs."),
    "data": ("data_tools.cli", "main", "Inspect, convert and synthesise multi-camera datasets."),
    "bench": ("bench.cli", "cli", "Speed, memory and compile benchmarks (from a source checkout)."),
    "aot": ("tritonsplat.cli", "aot_command", "Compile every Triton kernel for sm_80/sm_90 and report resources."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module, attribute, help_text = SUBCOMMANDS[name]
        try:
            command = getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError as error:
            message = (f"`tritonsplat {name}` needs the module {error.name!r}"
                       + (", which ships with the source checkout, not the wheel: run it from a clone"
                          if name == "bench" else ""))
            return click.Command(name, help=help_text, callback=lambda: (_ for _ in ()).throw(ExitError(message)))
        if command.help is None:
            command.help = help_text
        return command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, _, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.command("aot", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def aot_command(args) -> None:
    """Compile every Triton kernel for sm_80/sm_90 and report resources (python -m tritonsplat.aot)."""
    from .aot import main as aot_main

    sys.exit(aot_main(list(args)))


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tritonsplat", prog_name="tritonsplat")
def main() -> None:
    """tritonsplat: differentiable 3D Gaussian splatting in Triton and PyTorch, and Dynamic 3D Gaussians
    tracking."""


if __name__ == "__main__":
    main()
