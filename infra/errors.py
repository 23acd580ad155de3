"""One-line errors: every layer turns a refused input or a failed call into one line on stderr and exit 1."""

from __future__ import annotations

import functools
from typing import Callable

import typer


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name when it has none)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def errors_as_one_line(known: Callable[[], tuple[type[BaseException], ...]] = lambda: ()):
    """A decorator for commands: the errors `known()` names (imported only when one is raised) become one line
    on stderr and exit status 1."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                if isinstance(exc, tuple(known())):
                    fail(first_line(exc))
                raise
        return wrapper
    return decorate


class ReasonRequired(ValueError):
    """An operator action without a reason: nothing is moved."""


def require_reason(reason: str | None) -> str:
    """The reason, stripped; every promote, rollback, hold and withdrawal records one."""
    if not reason or not reason.strip():
        raise ReasonRequired("a reason is required")
    return reason.strip()
