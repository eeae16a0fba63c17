"""The one exception type users see: a message that names the input and the fix."""


class PhivisionError(Exception):
    """Bad input or an impossible request; the CLI prints the message and exits with status 2."""
