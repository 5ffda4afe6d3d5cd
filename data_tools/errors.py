"""The one exception type that data_tools raises for bad input."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data. The message names the offending file and what is wrong.

    The CLI turns it into a ``click.ClickException`` (one line, no traceback).
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")
