"""One-line error messages, shared by every layer that turns an exception into a message."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name when it has none)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]
