"""The one exception type for bad input: the CLI prints it as a single line and exits 2."""


class RacError(ValueError):
    """Bad input: the message names the bad value and the fix."""
