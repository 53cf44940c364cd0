"""Errors that the command line reports as one line with exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: an unknown name, a malformed spec, a missing or corrupt file.

    The message must say what was wrong and what is accepted; the CLI prints it without a traceback.
    """
