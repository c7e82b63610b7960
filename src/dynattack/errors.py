"""The one exception type the CLI turns into a single clear line and exit code 2."""


class DynattackError(Exception):
    """Bad input or environment: the message is shown to the user as is, without a traceback."""


def first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error; its type where the
    message is empty (EOFError, some IndexErrors)."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
