"""The one exception type the CLI turns into a single clear line and exit code 2."""


class DynattackError(Exception):
    """Bad input or environment: the message is shown to the user as is, without a traceback."""
