"""The one error type for user mistakes: the CLI turns it into a one-line message and exit code 2."""


class QtoolError(Exception):
    """Bad usage or bad input (missing model, wrong bits, corrupted artifact...).

    Anything else that escapes a command is an unexpected failure (exit code 1).
    """
