"""Command-line values of memcompile's commands (``recipes.*``, ``benchmarks.*``): range checks and
how a command reports an error (here, not in ``recipes``, so that the benchmarks use it without
torchtitan).

A value out of its range (``--batch-size 0``, ``--temperature nan``) is a :class:`UsageError`,
raised before any file is read or written: the command prints one line, ``error: --batch-size
must be >= 1, got 0``, and exits with code 2, as argparse and tyro do for a bad command line.
Other expected errors (a missing file, a checkpoint of another model) print ``error: ...`` and
exit with code 1. Neither shows a traceback.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class UsageError(ValueError):
    """A command-line value the command cannot run with; the message names the flag as the user
    types it."""


def check_at_least(flag: str, value: float | None, minimum: float) -> None:
    """``value >= minimum`` (NaN is refused); ``None``, an unset optional flag, passes."""
    if value is not None and not value >= minimum:  # `not >=`: NaN compares false
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def check_each_at_least(flag: str, values: Iterable[float] | None, minimum: float) -> None:
    """Every one of a list flag's ``values`` is ``>= minimum``; ``None`` (unset) passes."""
    for value in values or ():
        check_at_least(flag, value, minimum)


def check_positive(flag: str, value: float | None) -> None:
    """``value > 0`` (NaN is refused; infinity passes); ``None`` passes."""
    if value is not None and not value > 0:
        raise UsageError(f"{flag} must be > 0, got {value}")


def check_finite(flag: str, value: float | None, minimum: float = -math.inf) -> None:
    """A finite number (no NaN or infinity), at least ``minimum``; ``None`` passes."""
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    check_at_least(flag, value, minimum)


def check_between(
    flag: str, value: float | None, low: float, high: float, *, below_high: bool = False
) -> None:
    """``value`` in [low, high] (or [low, high) with ``below_high``); ``None`` passes."""
    if value is None:
        return
    if not (low <= value < high if below_high else low <= value <= high):
        raise UsageError(
            f"{flag} must be in [{low}, {high}{')' if below_high else ']'}, got {value}"
        )


def check_fraction(flag: str, value: float | None, *, below_one: bool = False) -> None:
    """``value`` in [0, 1] (or [0, 1) with ``below_one``); ``None`` passes."""
    check_between(flag, value, 0, 1, below_high=below_one)


def check_seed(flag: str, seed: int) -> None:
    """A seed ``torch.Generator.manual_seed`` takes (64 bits, signed or not)."""
    check_between(flag, seed, -(2**63), 2**64 - 1)


def check_device(flag: str, device: str) -> None:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"{flag} must be a torch device such as cpu or cuda, got {device!r}"
        ) from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: this machine has no such CUDA device")


@contextmanager
def reported_errors(*expected: type[Exception]) -> Iterator[None]:
    """Turn a :class:`UsageError` into exit code 2 and the ``expected`` errors into exit code 1,
    each as one line ``error: ...`` on stderr, with no traceback."""
    try:
        yield
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except expected as error:
        raise SystemExit(f"error: {error}") from None
