"""Exceptions of `tracking` and fault injection for resume tests.

Fault injection: the environment variable ``TRITONSPLAT_FAULT_AT="T:STEP[:MODE]"`` makes `fit` fail
at frame T, step STEP (an integer, or ``write``: after a frame file is written to its temporary
name, before it is renamed). MODE is ``raise`` (default: raise `InjectedFault`), ``kill`` (SIGKILL
this process: nothing is cleaned up), ``exit`` (``os._exit(75)``), ``interrupt`` (raise
KeyboardInterrupt, as Ctrl-C does) or ``nan`` (poison that step's loss with NaN, to exercise the NaN
stop).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "TRITONSPLAT_FAULT_AT"


class TrackingError(Exception):
    """A failure the user can act on; the CLI prints the message (no traceback) and exits with
    `exit_code`."""

    exit_code = 1


class ConfigMismatchError(TrackingError):
    """OUT holds a run made with another config or data (resume refused)."""

    exit_code = 2


class NaNLossError(TrackingError):
    """A loss term became NaN/Inf; completed frames are kept."""

    exit_code = 3

    def __init__(self, t: int, step: int, term: str, completed: int | None = None):
        self.t, self.step, self.term, self.completed = t, step, term, completed
        kept = f"; frames 0..{completed - 1} are complete and kept" if completed else ""
        super().__init__(f"loss term {term!r} became NaN/Inf at frame {t}, step {step}{kept}. "
                         "Try a smaller learning rate or check the input data.")


class StorageError(TrackingError):
    """Writing the run failed (full disk, permissions); completed frames are kept."""

    exit_code = 4


class InjectedFault(RuntimeError):
    """Raised by fault injection (TRITONSPLAT_FAULT_AT=...:raise)."""

    exit_code = 75


def _parse_fault() -> tuple[int, str, str] | None:
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{FAULT_ENV} must be T:STEP[:MODE], got {spec!r}")
    mode = parts[2] if len(parts) == 3 else "raise"
    if mode not in ("raise", "kill", "exit", "interrupt", "nan"):
        raise ValueError(f"{FAULT_ENV}: unknown mode {mode!r} (raise, kill, exit, interrupt, nan)")
    return int(parts[0]), parts[1], mode


def fault_at(t: int, step: int | str) -> str | None:
    """The fault mode scheduled at (t, step), or None. Acts for kill/exit/raise; returns "nan"."""
    fault = _parse_fault()
    if fault is None or fault[0] != t or fault[1] != str(step):
        return None
    mode = fault[2]
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(75)
    if mode == "raise":
        raise InjectedFault(f"injected fault at frame {t}, step {step}")
    if mode == "interrupt":
        raise KeyboardInterrupt
    return mode
