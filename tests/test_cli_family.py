"""One command family: `tritonsplat track|data|bench|aot` and the old entry points as aliases."""

from __future__ import annotations

import errno

import click
import pytest
from click.testing import CliRunner

from tritonsplat import cli


def test_group_lists_every_subcommand():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for name in ("track", "data", "bench", "aot"):
        assert name in result.output


@pytest.mark.parametrize("name, alias_module, alias_attribute", [
    ("track", "tracking.cli", "main"), ("data", "data_tools.cli", "main"), ("bench", "bench.cli", "cli")])
def test_subcommands_are_the_alias_commands(name, alias_module, alias_attribute):
    import importlib

    group = cli.main
    command = group.get_command(click.Context(group), name)
    assert command is getattr(importlib.import_module(alias_module), alias_attribute)
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0, result.output


def test_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(cli.main, ["nope"])
    assert result.exit_code == 2 and "No such command" in result.output


def _raiser(exc):
    @click.command()
    @cli.user_errors(on_interrupt="stopped; rerun to resume", disk_full="free space and rerun")
    def command():
        raise exc
    return command


class _CodedError(Exception):
    exit_code = 3


@pytest.mark.parametrize("exc, code, text", [
    (ValueError("--frames: expected A:B"), 1, "--frames: expected A:B"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), 1, "/x/y: No such file or directory"),
    (OSError(errno.ENOSPC, "No space left", "/out/run.h5"), 4, "disk full while writing /out/run.h5: free space"),
    (_CodedError("loss became NaN"), 3, "loss became NaN"),
    (KeyboardInterrupt(), 130, "stopped; rerun to resume"),
])
def test_user_errors_map_to_one_line_and_exit_code(exc, code, text):
    result = CliRunner().invoke(_raiser(exc), [])
    assert result.exit_code == code
    assert text in result.output
    assert "Traceback" not in result.output


def test_unexpected_errors_are_not_swallowed():
    result = CliRunner().invoke(_raiser(RuntimeError("bug")), [])
    assert isinstance(result.exception, RuntimeError)
